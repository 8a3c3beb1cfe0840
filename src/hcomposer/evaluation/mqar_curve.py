"""MQAR accuracy against sequence length, as a curve.

Decision: a *fresh copy of the architecture* is trained on MQAR at each length,
exactly as the MQAR proxy does (``evaluate_proxy(arch, "mqar")``), rather than
probing the run's text-trained weights in context. MQAR's sequences are random
key and value ids with no textual format; a model trained on text has never
learned that a query asks for the value after its key, so its accuracy is near
zero whatever its recall ability, and the curve would measure nothing. What
MQAR measures is how well the *pattern* can learn associative recall as the
distance grows, which a fresh copy answers. By default the copy has the
``proxy`` shape's width (the pattern kept, widths made small enough for a CPU);
``shape=None`` trains it at the run's own shape instead.

Difficulty grows with length: ``num_kv_pairs = length // kv_ratio`` (Zoology
scales the pairs with the length in the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hcomposer.architecture import Architecture
from hcomposer.config_io import Config
from hcomposer.data.mqar import MQARConfig
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.plots import save_png, subplots
from hcomposer.proxies.proxy import evaluate_proxy
from hcomposer.proxies.proxy_config import ProxyConfig

__all__ = ["MQARCurveConfig", "run_mqar_curve", "plot_mqar_curve", "mqar_markdown"]


@dataclass(frozen=True, kw_only=True)
class MQARCurveConfig(Config):
    """Lengths, pairs per length, training budget per length, and the training shape."""

    _what: ClassVar[str] = "mqar"

    lengths: tuple[int, ...] = spec(
        (64, 128, 256), ge=8, le=2**20, each=True, unit="tokens", help="even lengths"
    )
    kv_ratio: int = spec(16, ge=4, le=2**20, help="tokens per key-value pair (pairs = len / it)")
    vocab_size: int = spec(128, ge=8, le=2**20, unit="tokens")
    steps: int = spec(200, ge=1, le=10**7, help="training steps per length")
    batch_size: int = spec(32, ge=1, le=2**16)
    lrs: tuple[float, ...] = spec((3e-3,), gt=0, le=10.0, each=True, help="learning-rate grid")
    num_train_examples: int = spec(2048, ge=1, le=10**7)
    num_test_examples: int = spec(256, ge=1, le=10**7)
    shape: str | None = spec("proxy", help="shape of the fresh copies (None: the run's)")
    seed: int = spec(0, ge=0, le=MAX_SEED)
    dtype: str = spec("bf16", help="autocast dtype of the proxy runs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lengths or any(n % 2 for n in self.lengths):
            raise UserError("mqar lengths must be even and at least 8")


def _tasks(cfg: MQARCurveConfig):
    out = []
    for n in sorted(cfg.lengths):
        kv = max(1, min(n // cfg.kv_ratio, cfg.vocab_size // 2 - 2))
        out.append(
            MQARConfig(
                vocab_size=cfg.vocab_size, seq_len=n, num_kv_pairs=kv,
                num_train_examples=cfg.num_train_examples,
                num_test_examples=cfg.num_test_examples,
            )
        )  # fmt: skip
    return tuple(out)


def run_mqar_curve(
    arch: Architecture, config: MQARCurveConfig | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Train a fresh copy of ``arch`` per length on MQAR; accuracy and loss per length."""
    config = config or MQARCurveConfig()
    if config.shape is not None:
        arch = arch.with_shape(config.shape)
    tasks = _tasks(config)
    pcfg = ProxyConfig(
        steps=config.steps, batch_size=config.batch_size, lrs=config.lrs,
        mqar_tasks=tasks, dtype=config.dtype, seed=config.seed,
    )  # fmt: skip
    res = evaluate_proxy(arch, "mqar", seed=config.seed, config=pcfg, progress=progress)
    points = []
    for t in tasks:
        r = res.tasks[t.name]
        points.append(
            {
                "length": t.seq_len,
                "num_kv_pairs": t.num_kv_pairs,
                "accuracy": float(r["accuracy"]),
                "loss": r.get("loss"),
            }
        )
    return {
        "config": config.to_dict(),
        "pattern": arch.pattern,
        "shape": arch.shape.name,
        "mode": "fresh copy trained per length",
        "points": points,
        "accuracy_mean": sum(p["accuracy"] for p in points) / len(points),
        "wall_seconds": res.wall_seconds,
    }


def mqar_markdown(res: dict[str, Any]) -> str:
    rows = ["| length | kv pairs | accuracy | loss |", "|---|---|---|---|"]
    for p in res["points"]:
        loss = "-" if p["loss"] is None else f"{p['loss']:.3f}"
        rows.append(f"| {p['length']} | {p['num_kv_pairs']} | {p['accuracy']:.3f} | {loss} |")
    return "\n".join(rows)


def plot_mqar_curve(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """One line per label (e.g. pattern): accuracy against sequence length."""
    fig, ax = subplots(figsize=(5.5, 3.6))
    for label, res in results.items():
        xs = [p["length"] for p in res["points"]]
        ys = [p["accuracy"] for p in res["points"]]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (kv pairs grow with it)")
    ax.set_ylabel("MQAR accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
