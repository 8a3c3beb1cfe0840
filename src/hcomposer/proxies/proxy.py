"""Cheap proxy scores for search: MAD, MQAR and a text-loss proxy.

``evaluate_proxy(arch, "mad")`` trains a fresh model per MAD task on generated data
for a fixed number of AdamW steps at each point of a small learning-rate x weight-
decay grid, keeps the best held-out accuracy per task (MAD's protocol) and scores
the architecture by the mean over tasks. ``"mad:TASK[,TASK]"`` runs a subset,
``"mqar"`` runs MQAR at growing sequence lengths, ``"text"`` trains on a text
corpus for a token budget and scores minus the validation loss.

The architecture's shape is used as given except ``vocab_size`` and
``max_seq_len``, which each task sets. The same seed gives the same score.
A run whose loss turns non-finite scores 0 on that grid point, with the reason
recorded; it never raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.data.mad import MAD_TASKS, MADData, default_task_config, generate_task
from hcomposer.data.mqar import generate_mqar
from hcomposer.errors import UserError
from hcomposer.format import progress_bar
from hcomposer.proxies.proxy_config import ProxyConfig
from hcomposer.proxies.task import RunResult, TaskHooks, count_params, train_and_score
from hcomposer.proxies.text import evaluate_text
from hcomposer.training.step import resolve_device

__all__ = [
    "PROXIES",
    "QUICKSTART_PROXY",
    "ProxyPruned",
    "ProxyResult",
    "Report",
    "early_stop",
    "evaluate_proxy",
    "parse_proxy",
]

# ``report(step, value) -> bool``: the proxy's intermediate values (see evaluate_proxy).
Report = Callable[[int, float], bool]

# The quickstart's three-task subset: what separates attention, Mamba and MLP.
QUICKSTART_PROXY = "mad:in_context_recall,selective_copying,memorization"

# Short aliases accepted in "mad:TASK" (the full names work too).
TASK_ALIASES = {
    "recall": "in_context_recall",
    "fuzzy": "fuzzy_in_context_recall",
    "noisy": "noisy_in_context_recall",
    "copy": "selective_copying",
    "compress": "compression",
    "memorize": "memorization",
}


class ProxyPruned(Exception):
    """Raised by :func:`evaluate_proxy` when its ``report`` callback asks to stop.

    ``step`` and ``value`` are the last intermediate value reported. A pruned evaluation
    has no score: callers store it as pruned (e.g. ``optuna.TrialPruned``), never as one.
    """

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} (intermediate value {value:.4f})")
        self.step = step
        self.value = value


@dataclass
class ProxyResult:
    """A proxy's verdict on one architecture. ``score``: higher is better."""

    proxy: str
    pattern: str
    score: float
    tasks: dict[str, dict[str, Any]]
    params_total: int
    wall_seconds: float
    tokens_per_second: float
    tokens: int
    seed: int
    config: ProxyConfig
    failures: list[str] = field(default_factory=list)

    @property
    def failure(self) -> str | None:
        """The first failure, or None when every run finished with finite losses."""
        return self.failures[0] if self.failures else None

    def to_dict(self) -> dict[str, Any]:
        tasks = {
            name: {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in t.items()
            }
            for name, t in self.tasks.items()
        }
        return {
            "proxy": self.proxy,
            "pattern": self.pattern,
            "score": self.score,
            "tasks": tasks,
            "params_total": self.params_total,
            "wall_seconds": round(self.wall_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "tokens": self.tokens,
            "seed": self.seed,
            "failure": self.failure,
            "failures": list(self.failures),
            "config": self.config.to_dict(),
        }


def parse_proxy(proxy: str) -> tuple[str, tuple[str, ...]]:
    """``"mad"`` / ``"mad:recall,copy"`` / ``"mqar"`` / ``"text"`` -> (kind, task names).

    Unknown proxies or task names raise UserError listing the valid ones.
    """
    kind, _, rest = proxy.strip().partition(":")
    if kind not in PROXIES:
        raise UserError(f"unknown proxy {proxy!r}; valid: mad, mad:TASK[,TASK], mqar, text")
    if not rest:
        return kind, ()
    if kind != "mad":
        raise UserError(f"proxy {kind!r} takes no task list; only mad:TASK[,TASK] does")
    names = []
    for raw in rest.split(","):
        name = raw.strip().replace("-", "_")
        name = TASK_ALIASES.get(name, name)
        if name not in MAD_TASKS:
            valid = ", ".join(MAD_TASKS) + " (aliases: " + ", ".join(TASK_ALIASES) + ")"
            raise UserError(f"unknown MAD task {raw.strip()!r}; valid: {valid}")
        if name not in names:
            names.append(name)
    return kind, tuple(names)


def _task_list(kind: str, names: tuple[str, ...], config: ProxyConfig) -> list[tuple[str, Any]]:
    if kind == "mqar":
        return [(c.name, c) for c in config.mqar_tasks]
    by_name = {c.task: c for c in config.mad_tasks}
    wanted = names or tuple(by_name)
    out = []
    for name in wanted:
        # A task left out of the config's list still runs at its default difficulty.
        out.append((name, by_name.get(name) or default_task_config(name)))
    return out


def _generate(kind: str, cfg: Any, seed: int) -> MADData:
    return generate_mqar(cfg, seed) if kind == "mqar" else generate_task(cfg, seed)


def evaluate_proxy(
    arch: Architecture | str,
    proxy: str = "mad",
    *,
    seed: int = 0,
    data: str | Path | None = None,
    config: ProxyConfig | None = None,
    progress: bool = False,
    report: Report | None = None,
    device: str | torch.device = "auto",
) -> ProxyResult:
    """Score ``arch`` with a proxy (see the module docstring).

    ``seed`` decides the generated data, the initial weights and the batch order
    (it overrides ``config.seed``); ``data`` is the text proxy's corpus (None: the
    embedded one); ``progress`` shows a rich progress bar on stderr. ``device`` is where the
    models train (``"auto"``: CUDA when available, else CPU), with the trainer's autocast
    rule for ``config.dtype``.

    ``report(step, value) -> bool`` is the hook for pruners (MAD and MQAR proxies):
    after the k-th task finishes it is called with ``step=k`` and ``value`` = the mean
    reported accuracy of the first k tasks (the tasks run in a fixed order, so values at
    the same step are comparable across architectures; at the last step it equals the
    score). When it returns True before the last task the evaluation stops and raises
    :class:`ProxyPruned`.
    """
    if isinstance(arch, str):
        arch = Architecture.parse(arch, shape="proxy")
    config = (config or ProxyConfig()).replace(seed=seed)
    kind, names = parse_proxy(proxy)
    device = resolve_device(device)
    if kind != "text" and data is not None:
        raise UserError(f"--data is only used by the text proxy, not by {kind!r}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    job = ProxyJob(arch=arch, proxy=proxy, kind=kind, names=names, seed=seed, config=config,
                   data=data, progress=progress, report=report, device=device)  # fmt: skip
    try:
        return PROXY_KINDS[kind](job)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class ProxyJob:
    """One proxy evaluation's inputs, resolved (what :func:`evaluate_proxy` was given)."""

    arch: Architecture
    proxy: str
    kind: str
    names: tuple[str, ...]
    seed: int
    config: ProxyConfig
    data: str | Path | None = None
    progress: bool = False
    report: Report | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _evaluate_text(job: ProxyJob) -> ProxyResult:
    """The text proxy: validation loss of a short language-model run (``proxies.text``)."""
    t0 = time.perf_counter()
    score, task, tokens, failures = evaluate_text(
        job.arch, data=job.data, config=job.config, progress=job.progress, device=job.device
    )
    return _result(job.arch, job.proxy, score, {"text": task}, tokens, failures, job.config, t0)


class _Bar:
    """The progress bar of a synthetic proxy: steps, tokens per second, the grid point."""

    def __init__(self, bar, label: str, total: int):
        self.bar, self.total = bar, total
        self.handle = bar.add_task(label, total=total, rate="")
        self.started = time.perf_counter()
        self.tokens = 0

    def on_step(self, steps: int, n_tok: int) -> None:
        self.tokens += n_tok
        rate = self.tokens / max(1e-9, time.perf_counter() - self.started)
        self.bar.update(self.handle, advance=steps, rate=f"{rate:,.0f} tok/s")

    def describe(self, text: str) -> None:
        self.bar.update(self.handle, description=text)

    def add_total(self, steps: int) -> None:
        self.total += steps
        self.bar.update(self.handle, total=self.total)

    def skip(self, steps: int) -> None:
        self.bar.update(self.handle, advance=steps)


def _evaluate_synthetic(job: ProxyJob) -> ProxyResult:
    """MAD or MQAR: each task's grid of rates and weight decays, the best point's accuracy
    per task (chosen on validation), their mean the score; pruners asked after each task."""
    t0 = time.perf_counter()
    config = job.config
    tasks = _task_list(job.kind, job.names, config)
    grid = [(lr, wd) for lr in config.lrs for wd in config.weight_decays]
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    tokens = 0
    total = len(grid) * sum(config.steps_for(name) for name, _ in tasks)
    with progress_bar(job.progress, field="rate") as p:
        bar = _Bar(p, job.proxy, total)
        for i, (name, cfg) in enumerate(tasks):
            task_data = _generate(job.kind, cfg, job.seed)
            runs = _task_runs(job, i, name, task_data, grid, bar)
            tokens += sum(r.tokens for r in runs)
            failures += [f"{name}: {r.failure}" for r in runs if r.failure]
            results[name] = _best(runs, count_params(job.arch, task_data))
            if job.report is not None:
                value = sum(r["accuracy"] for r in results.values()) / len(results)
                # After the last task the score is known: stopping there would save nothing
                # and lose it, so the answer is only heeded before.
                if job.report(len(results), value) and len(results) < len(tasks):
                    raise ProxyPruned(len(results), value)
    score = sum(r["accuracy"] for r in results.values()) / len(results)
    return _result(job.arch, job.proxy, score, results, tokens, failures, config, t0)


def _task_runs(job: ProxyJob, i: int, name: str, task_data: MADData, grid, bar: _Bar):
    """Every grid point of one task (a stalled run restarts from new weights, up to
    ``config.restarts`` times); with ``stop_when_perfect`` the grid ends at a solved point."""
    config = job.config
    cap = config.steps_for(name)
    runs: list[RunResult] = []
    hooks = TaskHooks(on_step=bar.on_step)
    for j, (lr, wd) in enumerate(grid):
        for attempt in range(config.restarts + 1):
            bar.describe(f"{name} lr={lr:g} wd={wd:g}" + (f" restart {attempt}" if attempt else ""))
            hooks.on_check = early_stop(config)
            run = train_and_score(job.arch, task_data,
                                  config.task_run(name, lr, wd, _run_seed(job.seed, i, attempt)),
                                  hooks=hooks, device=job.device)  # fmt: skip
            run.restart = attempt
            runs.append(run)
            solved = _selection_accuracy(run) >= min(1.0, config.solved_accuracy)
            stalled = not solved and run.failure is None and run.steps_done < cap
            if not stalled or attempt == config.restarts:
                break
            bar.add_total(cap)
        if config.stop_when_perfect and solved:
            bar.skip(cap * (len(grid) - j - 1))
            break
    return runs


# Each proxy kind and how it is evaluated (``parse_proxy`` checks names against it).
PROXY_KINDS: dict[str, Callable[[ProxyJob], ProxyResult]] = {
    "mad": _evaluate_synthetic,
    "mqar": _evaluate_synthetic,
    "text": _evaluate_text,
}
PROXIES = tuple(PROXY_KINDS)


def _result(arch, proxy, score, tasks, tokens, failures, config, t0) -> ProxyResult:
    wall = time.perf_counter() - t0
    return ProxyResult(
        proxy=proxy,
        pattern=arch.pattern,
        score=score,
        tasks=tasks,
        params_total=int(count_costs(arch).params_total),
        wall_seconds=wall,
        tokens_per_second=tokens / max(wall, 1e-9),
        tokens=tokens,
        seed=config.seed,
        config=config,
        failures=failures,
    )


def _run_seed(seed: int, task_index: int, restart: int = 0) -> int:
    # One initialisation per task, shared by its grid points (a fair comparison of
    # learning rates); different tasks start from different weights. A restart after a
    # stall draws new weights (seeds far from every first attempt's).
    return seed * 1000 + task_index + 1_000_003 * restart


def early_stop(config: ProxyConfig) -> Callable[[int, float], bool]:
    """The ``on_check`` rule of one training run: stop once the validation accuracy
    reaches ``solved_accuracy``, or (``patience`` > 0) after ``patience`` checks in a row
    without a gain of ``min_delta`` over the best so far."""
    best = [-1.0]
    stale = [0]

    def check(step: int, accuracy: float) -> bool:
        if accuracy >= config.solved_accuracy:
            return True
        if accuracy >= best[0] + config.min_delta:
            best[0], stale[0] = accuracy, 0
        else:
            stale[0] += 1
        return config.patience > 0 and stale[0] >= config.patience

    return check


def _selection_accuracy(run: RunResult) -> float:
    return run.val_accuracy if math.isfinite(run.val_accuracy) else run.accuracy


def _best(runs: list[RunResult], params: int) -> dict[str, Any]:
    # The grid point with the highest validation accuracy (the test split is never used
    # to choose); ties go to the lower test loss (a failed run has loss nan and accuracy
    # 0, so it never wins against a finished one). Its test accuracy is reported.
    def key(r: RunResult):
        return (_selection_accuracy(r), -(r.loss if math.isfinite(r.loss) else math.inf))

    best = max(runs, key=key)
    return {
        "accuracy": best.accuracy,
        "val_accuracy": _selection_accuracy(best),
        "steps": best.steps_done,
        "loss": best.loss,
        "lr": best.lr,
        "weight_decay": best.weight_decay,
        "params": params,
        "grid": [r.to_dict() for r in runs],
    }
