"""The scale ruler: each pattern's loss at scale, trained well enough to rank patterns by.

A proxy is judged by how it ranks patterns against this ruler, so the ruler must not rank
by accident. What it does for every pattern (the issue that asked for it lists why):

- **Its own learning rate.** A grid (default x0.5, x1, x2 of the recipe's rate) is compared
  by a cheap rule: a short run of ``select_fraction`` of the budget at each rate, ending in
  its own warmup-stable-decay cooldown, scored on the *validation* split. Comparing after a
  cooldown, not mid-schedule, avoids favouring high rates. When the best rate is at the
  grid's edge, the next rate beyond it is tried too (once per side).
  ``check_patterns`` also train every grid rate at the full budget, which shows whether the
  cheap pick matches the full grid's.
- **Several seeds** at the chosen rate (initial weights and data order both follow the
  seed), each scored on a separate *test* split that nothing is chosen on.
- **One token budget** for every pattern, in a BPE tokenizer trained on the training split.
- **Flags, never silent averages.** A run that diverges (non-finite loss), spikes (a logged
  training loss more than ``spike_nats`` above its running minimum after warmup) or ends no
  better than the unigram loss of the training tokens is flagged and retried at the next
  lower rate; the flagged run stays in the log.

Text: the embedded corpus cut into chapters, each chapter assigned to train, validation or
test by a hash of its text (``prepare_text``), so the three never share a chapter; patterns
split into dev and held out by family (``split_patterns``). Both live in
:mod:`hcomposer.proxies.ruler_text` and are importable from here.

Everything is appended to JSON-lines logs in the study folder (one line per finished run),
so a killed study resumes where it stopped and a finished run is never repeated; several
workers (``shard=(i, n)``) may share one folder. Run folders (checkpoints) go to ``work_dir``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.data import load_tokenizer
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl, atomic_write_json, read_json, read_jsonl
from hcomposer.proxies.ruler_text import family, prepare_text, split_patterns
from hcomposer.runs import RulerDir, RunDir
from hcomposer.scaling.extrapolate import stack
from hcomposer.shapes import Shape
from hcomposer.stats import spearman_ci
from hcomposer.training.step import evaluate
from hcomposer.training.trainer import TrainConfig, load_run, train

__all__ = [
    "Ruler",
    "RulerConfig",
    "RULER_SHAPE",
    "prepare_text",
    "split_patterns",
    "plan",
    "run_ruler",
    "ruler_losses",
    "flag_run",
    "family",
    "reliability",
    "rate_rule_check",
]

# The ruler's width: d_model 64 (the search proxy's width with the usual 0.02 init), so
# that 5 tokens per non-embedding parameter fit the corpus and about 12 CPU-hours.
RULER_SHAPE: dict[str, Any] = {
    "name": "ruler64",
    "d_model": 64,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_dim": 192,
    "vocab_size": 4096,
    "max_seq_len": 256,
    "window": 64,
    "ssm_state": 32,
    "ssm_head_dim": 16,
    "ssm_chunk": 32,
    "dn_chunk": 32,
    "n_experts": 8,
    "top_k": 1,
    "expert_ffn_dim": 96,
}


@dataclass(frozen=True, kw_only=True)
class RulerConfig:
    """What decides every ruler run (recorded in the study's ``ruler.json``)."""

    shape: dict[str, Any] = field(default_factory=lambda: dict(RULER_SHAPE))
    layers: int = 12
    tokens: int = 1_638_400
    batch_size: int = 16
    seq_len: int = 256
    base_lr: float = 3e-3
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Tried beyond the grid's edge when the best rate sits on it (one step per side).
    edge_factors: tuple[float, float] = (0.25, 4.0)
    select_fraction: float = 0.25
    seeds: tuple[int, ...] = (0, 1)
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.01
    tokenizer: str = "bpe:4096"
    spike_nats: float = 0.5
    dtype: str = "fp32"
    text_fractions: tuple[float, float] = (0.9, 0.05)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len

    def select_tokens(self) -> int:
        steps = max(
            self.warmup_steps + 5, round(self.select_fraction * self.tokens / self.step_tokens)
        )
        return steps * self.step_tokens


# ---------------------------------------------------------------- runs


def _arch(pattern: str, cfg: RulerConfig) -> Architecture:
    return Architecture.parse(stack(pattern, cfg.layers), Shape(**cfg.shape))


def _lr_key(lr: float) -> str:
    return f"{lr:.3g}"


def _run_name(pattern: str, lr: float, tokens: int, seed: int) -> str:
    name = pattern.replace("|", "_").replace("[", "(").replace("]", ")")
    return f"{name}/lr{_lr_key(lr)}-t{tokens}-s{seed}"


def _train_config(cfg: RulerConfig, lr: float, tokens: int, seed: int, data: str):
    return TrainConfig(
        tokens=tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=lr,
        min_lr=lr * cfg.min_lr_ratio, warmup=cfg.warmup_steps, schedule="wsd",
        decay_fraction=cfg.decay_fraction, dtype=cfg.dtype, eval_every=10**9,
        eval_tokens=cfg.step_tokens, log_every=5, checkpoint_every=100, seed=seed, data=data,
        tokenizer=cfg.tokenizer, val_fraction=0.005, threads=1,
    )  # fmt: skip


def flag_run(metrics: list[dict], status: str, loss: float | None, unigram: float,
             *, warmup: int, spike_nats: float) -> str | None:  # fmt: skip
    """Why a run is not to be trusted (``diverged``, ``spiked``, ``above-unigram``), or None."""
    if status == "diverged" or loss is None or not math.isfinite(loss):
        return "diverged"
    best = math.inf
    for rec in metrics:
        value = rec.get("loss")
        if value is None:
            continue
        if not math.isfinite(value):
            return "diverged"
        if rec.get("step", 0) > 2 * warmup and value > best + spike_nats:
            return "spiked"
        best = min(best, value)
    if loss >= unigram:
        return "above-unigram"
    return None


def _token_windows(tokens: np.ndarray, seq_len: int) -> list[tuple[Any, Any]]:
    n = (len(tokens) - 1) // seq_len
    x = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    y = torch.from_numpy(tokens[1 : n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _split_tokens(tokenizer, path: str) -> np.ndarray:
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids.extend(tokenizer.encode(json.loads(line)["text"]))
                ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def _score(run_dir: Path, text: dict, splits: tuple[str, ...], cache: dict) -> dict[str, float]:
    """Mean next-token loss of the run's final weights over each whole split."""
    model, _, tokenizer, _ = load_run(run_dir)
    out = {}
    for split in splits:
        key = (tokenizer.identity, split)
        if key not in cache:
            cache[key] = _split_tokens(tokenizer, text[split]["path"])
        batches = _token_windows(cache[key], 256)
        with torch.no_grad():
            res = evaluate(lambda x, y: (model(x), y), batches, device=torch.device("cpu"),
                           dtype="fp32", modules=[model])  # fmt: skip
        out[split] = float(res.loss)
    return out


def _unigram(tokenizer, train_path: str, cache: dict) -> float:
    key = (tokenizer.identity, "unigram")
    if key not in cache:
        ids = _split_tokens(tokenizer, train_path)
        counts = np.bincount(ids).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        cache[key] = float(-(p * np.log(p)).sum())
    return cache[key]


class Ruler:
    """One study folder: its config, text, logs; ``run(pattern)`` does a pattern's runs."""

    def __init__(self, out: str | Path, cfg: RulerConfig, work_dir: str | Path | None = None,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.out = Path(out)
        self.cfg = cfg
        self.work = Path(work_dir) if work_dir else self.out / "runs"
        self.log = log
        self._check_config()
        self.text = prepare_text(self.out / "data", cfg.text_fractions)
        self.runs_log = RulerDir(self.out).runs
        self.cache: dict = {}

    def _check_config(self) -> None:
        path = RulerDir(self.out).config
        want = self.cfg.to_dict()
        if path.is_file():
            have = read_json(path)
            if have != want:
                diff = sorted(k for k in {*have, *want} if have.get(k) != want.get(k))
                raise UserError(
                    f"{self.out} holds a ruler made with other settings ({', '.join(diff)}); "
                    "give a new --out, or the same settings to resume it"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, want)

    def done(self) -> dict[tuple, dict]:
        return {
            (r["pattern"], r["lr"], r["tokens"], r["seed"]): r for r in read_jsonl(self.runs_log)
        }

    def train_one(self, pattern: str, lr: float, tokens: int, seed: int, role: str) -> dict:
        """One run (or its logged record), scored on validation (and test for full runs)."""
        key = (pattern, float(_lr_key(lr)), tokens, seed)
        prior = self.done().get(key)
        if prior is not None:
            return prior
        cfg = self.cfg
        lr = key[1]
        run_dir = self.work / _run_name(pattern, lr, tokens, seed)
        tcfg = _train_config(cfg, lr, tokens, seed, self.text["train"]["path"])
        res = train(_arch(pattern, cfg), tcfg, run_dir, resume=run_dir.exists(), progress=False)
        metrics = list(read_jsonl(RunDir(run_dir).metrics)) if res.status != "diverged" else []
        tokenizer = load_tokenizer(RunDir(run_dir).tokenizer)
        unigram = _unigram(tokenizer, self.text["train"]["path"], self.cache)
        losses: dict[str, float] = {}
        if res.status != "diverged":
            splits = ("val", "test") if tokens == cfg.tokens else ("val",)
            losses = _score(run_dir, self.text, splits, self.cache)
        flag = flag_run(metrics, res.status, losses.get("val"), unigram,
                        warmup=cfg.warmup_steps, spike_nats=cfg.spike_nats)  # fmt: skip
        rec = {
            "pattern": pattern, "lr": lr, "tokens": tokens, "seed": seed, "role": role,
            "status": res.status, "flag": flag, "val_loss": losses.get("val"),
            "test_loss": losses.get("test"), "unigram_loss": unigram,
            "train_loss": res.loss, "params": res.params_total,
            "wall_seconds": res.wall_seconds, "tokens_per_s": res.tokens_per_second,
        }  # fmt: skip
        append_jsonl(self.runs_log, rec)
        self.log(
            f"{role} {pattern} lr {lr:g} seed {seed}: val {rec['val_loss']} test "
            f"{rec['test_loss']} flag {flag} ({res.wall_seconds:.0f}s)"
        )
        return rec

    def text_proxy(self, pattern: str, tokens: int, seed: int) -> dict[str, Any]:
        """A short run on the ruler's training text at the recipe's base rate (a proxy,
        not part of the ruler): its validation loss and CPU seconds. Never scored on test."""
        cfg = self.cfg
        run_dir = self.work / "proxy" / _run_name(pattern, cfg.base_lr, tokens, seed)
        # Its own warmup, a tenth of its steps: the ruler's 20 would be most of a short run.
        steps = tokens // cfg.step_tokens
        tcfg = _train_config(cfg, cfg.base_lr, tokens, seed, self.text["train"]["path"]).replace(
            warmup=max(1, steps // 10)
        )
        cpu0 = time.process_time()
        res = train(_arch(pattern, cfg), tcfg, run_dir, resume=run_dir.exists(), progress=False)
        val = None
        if res.status == "completed":
            val = _score(run_dir, self.text, ("val",), self.cache)["val"]
        return {"val_loss": val, "status": res.status,
                "cpu_seconds": time.process_time() - cpu0}  # fmt: skip

    def choose_lr(self, pattern: str) -> float:
        """The cheap rule: short cooldown runs over the grid, best validation loss wins."""
        cfg = self.cfg
        tokens = cfg.select_tokens()
        factors = list(cfg.lr_factors)
        scores: dict[float, float] = {}
        tried: set[float] = set()
        while True:
            for f in factors:
                if f in tried:
                    continue
                tried.add(f)
                rec = self.train_one(pattern, cfg.base_lr * f, tokens, 0, "select")
                if rec["flag"] is None:
                    scores[f] = rec["val_loss"]
            if not scores:
                raise UserError(f"{pattern}: every rate of the grid was flagged")
            best = min(scores, key=lambda f: (scores[f], f))
            lo_edge, hi_edge = cfg.edge_factors
            extra = None
            if best == min(factors) and lo_edge not in tried and lo_edge < best:
                extra = lo_edge
            elif best == max(factors) and hi_edge not in tried and hi_edge > best:
                extra = hi_edge
            if extra is None:
                return cfg.base_lr * best
            factors.append(extra)

    def lower_rates(self, lr: float) -> list[float]:
        cfg = self.cfg
        grid = sorted({cfg.base_lr * f for f in (*cfg.lr_factors, *cfg.edge_factors)})
        return [r for r in reversed(grid) if r < lr * (1 - 1e-9)]

    def run(self, pattern: str, *, full_grid: bool = False) -> None:
        cfg = self.cfg
        lr = self.choose_lr(pattern)
        for seed in cfg.seeds:
            rates = [lr, *self.lower_rates(lr)]
            for rate in rates:
                rec = self.train_one(pattern, rate, cfg.tokens, seed, "final")
                if rec["flag"] is None:
                    break
        if full_grid:
            for f in cfg.lr_factors:
                self.train_one(pattern, cfg.base_lr * f, cfg.tokens, 0, "grid")


def plan(patterns: list[str], cfg: RulerConfig) -> dict[str, Any]:
    """Non-embedding (active) parameters per pattern and what the budget means for them."""
    rows = {}
    for p in patterns:
        c = count_costs(_arch(p, cfg))
        rows[p] = c.params_active - c.params_embedding
    med = statistics.median(rows.values())
    return {
        "non_embedding_active_params": rows,
        "median": med,
        "tokens": cfg.tokens,
        "tokens_per_median_param": cfg.tokens / med,
    }


def run_ruler(
    out: str | Path,
    patterns: list[str],
    cfg: RulerConfig,
    *,
    check_patterns: tuple[str, ...] = (),
    shard: tuple[int, int] = (0, 1),
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Every pattern of this worker's share (pattern ``k`` goes to worker ``k % n``)."""
    ruler = Ruler(out, cfg, work_dir, log)
    i, n = shard
    for k, p in enumerate(patterns):
        if k % n == i:
            try:
                ruler.run(p, full_grid=p in check_patterns)
            except UserError as e:
                # Every rate flagged: the pattern is reported as failed, the study goes on.
                log(f"{p}: {e}")


def ruler_losses(out: str | Path) -> dict[str, dict[str, Any]]:
    """Per pattern: the chosen rate's unflagged test losses by seed, and their mean."""
    final: dict[str, dict[int, float]] = {}
    for r in read_jsonl(RulerDir(out).runs):
        if r.get("role") == "final" and r.get("flag") is None and r.get("test_loss") is not None:
            final.setdefault(r["pattern"], {})[int(r["seed"])] = float(r["test_loss"])
    return {p: {"seeds": v, "mean": statistics.fmean(v.values())} for p, v in final.items()}


def reliability(losses: dict[str, dict[str, Any]], seeds: tuple[int, int] = (0, 1)) -> dict:
    """The ruler's own noise over the patterns with both ``seeds``: Spearman between the two
    seeds' rankings (with a bootstrap interval; the ceiling any proxy can reach), the
    Spearman-Brown reliability of the two-seed mean (2r / (1 + r)), and each pattern's seed
    spread (|loss of seed a - loss of seed b|)."""
    a, b = seeds
    both = sorted(p for p, v in losses.items() if a in v["seeds"] and b in v["seeds"])
    spread = {p: abs(losses[p]["seeds"][a] - losses[p]["seeds"][b]) for p in both}
    out: dict[str, Any] = {"n": len(both), "spread": spread}
    if len(both) >= 3:
        x = [losses[p]["seeds"][a] for p in both]
        y = [losses[p]["seeds"][b] for p in both]
        rho, lo, hi = spearman_ci(x, y)
        out.update(
            seed_spearman=rho,
            seed_spearman_ci=[lo, hi],
            spearman_brown=2 * rho / (1 + rho) if rho > -1 else None,
            spread_median=statistics.median(spread.values()),
        )
    return out


def rate_rule_check(out: str | Path, patterns: list[str], cfg: RulerConfig) -> list[dict]:
    """For each pattern trained at every grid rate at the full budget (seed 0): the rate the
    cheap rule chose, the one the full grid's validation loss chooses, and the test-loss cost
    of the cheap pick (its test loss minus the full-grid pick's; 0 when they agree)."""
    recs = [r for r in read_jsonl(RulerDir(out).runs) if r.get("flag") is None]
    rows = []
    for p in patterns:
        full = {r["lr"]: r for r in recs
                if r["pattern"] == p and r["tokens"] == cfg.tokens and r["seed"] == 0}  # fmt: skip
        chosen = [r["lr"] for r in recs if r["pattern"] == p and r["role"] == "final"
                  and r["seed"] == 0]  # fmt: skip
        if not chosen or len(full) < len(cfg.lr_factors):
            continue
        grid_pick = min(full, key=lambda lr: (full[lr]["val_loss"], lr))
        cheap = chosen[0]
        rows.append({
            "pattern": p, "cheap_lr": cheap, "grid_lr": grid_pick, "agree": cheap == grid_pick,
            "test_cost": full[cheap]["test_loss"] - full[grid_pick]["test_loss"],
            "grid": {str(lr): full[lr]["val_loss"] for lr in sorted(full)},
        })  # fmt: skip
    return rows
