"""What a trial evaluates: the proxy (default) or an injected callable.

An objective is ``objective(arch, proxy=..., seed=...)`` (and ``report=...`` when the search
has a pruner: call ``report(step, value)``, stop by raising ``optuna.TrialPruned`` or
``ProxyPruned`` when it returns True) returning a ``ProxyResult``
(anything with ``.score``, optionally ``.tokens_per_second`` and ``.to_dict()``), a dict
with ``"score"``, or a plain float. Higher scores are better.

``synthetic`` is a test facility: a deterministic score table over patterns that trains
nothing, so the search machinery (resume, workers, samplers) can be tested in seconds and
from the command line (``--proxy synthetic`` or ``synthetic:SECONDS`` to sleep per trial).
It is not a proxy for anything and is hidden from ``--help``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.proxies.proxy import Report, evaluate_proxy, parse_proxy
from hcomposer.proxies.proxy_config import ProxyConfig

__all__ = [
    "Objective",
    "Outcome",
    "proxy_objective",
    "synthetic_objective",
    "synthetic_score",
    "is_synthetic",
    "resolve_objective",
    "normalise_result",
    "check_proxy",
]

Objective = Callable[..., Any]


@dataclass
class Outcome:
    """A normalised objective result: the score and what else the trial records."""

    score: float
    tokens_per_second: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def normalise_result(result: Any) -> Outcome:
    """Accept a ProxyResult-like object, a dict or a number."""
    if isinstance(result, (int, float)):
        return Outcome(float(result))
    if isinstance(result, dict):
        if "score" not in result:
            raise TypeError("objective returned a dict without 'score'")
        return Outcome(
            float(result["score"]), _opt_float(result.get("tokens_per_second")), dict(result)
        )
    if not hasattr(result, "score"):
        raise TypeError(f"objective returned {type(result).__name__}, which has no 'score'")
    details = result.to_dict() if hasattr(result, "to_dict") else {}
    return Outcome(
        float(result.score), _opt_float(getattr(result, "tokens_per_second", None)), details
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def is_synthetic(proxy: str) -> bool:
    return proxy == "synthetic" or proxy.startswith("synthetic:")


def proxy_objective(
    arch: Architecture,
    proxy: str = "mad",
    *,
    seed: int = 0,
    config: ProxyConfig | dict | None = None,
    report: Report | None = None,
) -> Any:
    """The real evaluator: ``hcomposer.proxies.proxy.evaluate_proxy``.

    ``config`` is the search's ``proxy_config`` (or a dict of the ``ProxyConfig`` fields
    that differ from the defaults: steps, tasks, learning-rate grid).
    """
    if isinstance(config, dict):
        config = ProxyConfig.from_dict(config) if config else None
    return evaluate_proxy(arch, proxy, seed=seed, config=config, report=report)


def _unit(*parts: Any) -> float:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def synthetic_score(pattern: str, seed: int = 0) -> float:
    """A fixed, structured score in about [0, 1] for a canonical pattern (no training).

    Shaped like the Composer findings so that model-based samplers have something to
    learn: attention is worth most early, the best attention share is about a third, a
    leading MLP is penalised, Mamba helps a little in the middle, plus a small
    pattern-specific term so that ties are rare.
    """
    arch = Architecture.parse(pattern, shape="tiny")
    n = arch.n_sublayers
    score, n_attn = 0.0, 0
    for i, sub in enumerate(arch.layers):
        depth = i / max(1, n - 1)
        for tok in sub:
            w = 1.0 / len(sub)
            if tok in "AW":
                n_attn += w
                score += w * (0.6 - 0.4 * depth) * (0.8 if tok == "W" else 1.0)
            elif tok == "S":
                score += w * 0.25 * (1.0 - abs(2 * depth - 1))
            elif tok in "FE":
                score += w * 0.2 * depth
    score /= n
    score -= 0.8 * abs(n_attn / n - 1 / 3)
    if arch.layers[0] in (("F",), ("E",)):
        score -= 0.1
    return round(score + 0.01 * _unit(pattern, seed), 6)


def synthetic_objective(
    arch: Architecture, proxy: str = "synthetic", *, seed: int = 0, report: Report | None = None
) -> dict:
    """The synthetic test objective; ``synthetic:SECONDS`` sleeps that long per trial.
    It has one step, so a pruner never stops it (``report`` is accepted and not called)."""
    _, _, delay = proxy.partition(":")
    t0 = time.perf_counter()
    if delay:
        time.sleep(float(delay))
    score = synthetic_score(arch.pattern, seed)
    # A made-up throughput: attention slows, Mamba and MLP do not.
    counts = sum(tok in "AW" for sub in arch.layers for tok in sub)
    tps = 1e5 / (1.0 + 0.5 * counts / max(1, arch.n_sublayers))
    return {
        "score": score,
        "tokens_per_second": tps,
        "proxy": proxy,
        "wall_seconds": time.perf_counter() - t0,
    }


def resolve_objective(
    proxy: str, objective: Objective | None, proxy_config: ProxyConfig | dict | None = None
) -> Objective:
    """The callable a search uses: the injected one, the synthetic one or the proxy."""
    if objective is not None:
        return objective
    if is_synthetic(proxy):
        _, _, delay = proxy.partition(":")
        if delay:
            try:
                ok = math.isfinite(float(delay)) and float(delay) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise UserError(f"--proxy {proxy!r}: write synthetic:SECONDS with SECONDS >= 0")
        return synthetic_objective
    if proxy_config:
        # A partial of a module-level function stays picklable for spawned workers.
        return functools.partial(proxy_objective, config=proxy_config)
    return proxy_objective


def check_proxy(proxy: str) -> None:
    """Fail early on a proxy name the evaluator does not know (when it can tell)."""
    if is_synthetic(proxy):
        resolve_objective(proxy, None)
        return
    parse_proxy(proxy)
