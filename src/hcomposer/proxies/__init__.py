"""Cheap proxy scores for search: MAD, MQAR and a text-loss proxy, trained by the training core."""

from hcomposer.proxies.proxy import (
    PROXIES,
    ProxyConfig,
    ProxyResult,
    evaluate_proxy,
    parse_proxy,
)

__all__ = ["PROXIES", "ProxyConfig", "ProxyResult", "evaluate_proxy", "parse_proxy"]
