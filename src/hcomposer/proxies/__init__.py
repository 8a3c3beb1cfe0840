"""Cheap proxy scores for search: MAD, MQAR and a text-loss proxy, trained by the training core."""

from hcomposer.proxies.proxy import PROXIES, ProxyResult, evaluate_proxy, parse_proxy
from hcomposer.proxies.proxy_config import ProxyConfig

__all__ = ["PROXIES", "ProxyConfig", "ProxyResult", "evaluate_proxy", "parse_proxy"]
