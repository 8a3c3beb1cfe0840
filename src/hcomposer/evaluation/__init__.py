"""Evaluation: cheap proxies for search (MAD, MQAR, text loss)."""

from hcomposer.evaluation.proxy import (
    PROXIES,
    ProxyConfig,
    ProxyResult,
    evaluate_proxy,
    parse_proxy,
)

__all__ = ["PROXIES", "ProxyConfig", "ProxyResult", "evaluate_proxy", "parse_proxy"]
