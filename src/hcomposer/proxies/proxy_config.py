"""How a proxy trains and scores: :class:`ProxyConfig`, its calibrated defaults and the
reasons for them (``docs/proxies.md``). The proxies that read it are in
:mod:`hcomposer.proxies.proxy`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hcomposer.config_io import Config, load_config, stamp
from hcomposer.data.mad import MAD_TASKS, MADTaskConfig, default_task_config
from hcomposer.data.mqar import DEFAULT_MQAR, MQARConfig
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.proxies.task import TaskRun
from hcomposer.training.schedule import SCHEDULES
from hcomposer.training.step import DTYPES

__all__ = ["ProxyConfig"]


def _default_mad() -> tuple[MADTaskConfig, ...]:
    return tuple(default_task_config(t) for t in MAD_TASKS)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig(Config):
    """How a proxy trains and scores. Frozen; round-trips to JSON.

    ``lrs`` x ``weight_decays`` is the grid: per task the point with the best accuracy on
    the validation split is chosen and its accuracy on the separate test split reported.
    Every ``check_every`` steps (0: never) the validation accuracy is measured; a run that
    reaches ``solved_accuracy`` stops there (early stopping), and with
    ``stop_when_perfect`` the rest of that task's grid is skipped (no point can do better).
    ``task_steps`` caps one task's steps below ``steps`` (task name -> steps);
    ``task_batch_sizes`` sets one task's batch size instead of ``batch_size``.
    ``patience`` > 0 also stops a run after that many checks without a gain of
    ``min_delta`` over its best so far: the run has *stalled*. A stalled run is started
    again from new initial weights (and a new batch order), up to ``restarts`` times per
    grid point, and the best run on the validation split is kept. Recall plateaus near
    chance for a seed-dependent number of steps before the induction circuit forms, and
    on some seeds it does not form within the budget at all; a restart turns that
    all-or-nothing draw into a second chance, so that the score says whether the pattern
    *can* learn the task rather than whether its first initialisation was lucky. A run
    that reaches its step cap is not stalled and is not restarted. ``schedule``
    (``wsd`` or ``cosine``) is the MAD/MQAR runs' learning-rate schedule; the text proxy keeps
    its cosine. ``dtype`` is
    ``bf16`` (autocast) or ``fp32``. ``threads`` is torch's intra-op thread count during
    the evaluation (0 leaves it alone): one thread per evaluation, and parallel evaluations as
    separate workers, because on a shared 2-core machine two threads per process
    ran many times slower than one (OpenMP threads waiting on each other).
    The text proxy trains for ``text_tokens`` tokens at ``text_lr``.
    """

    _what: ClassVar[str] = "proxy config"

    # Calibrated defaults (docs/proxies.md, benchmarks/calibrate_proxy.py): at most 600
    # steps per run (the recall tasks' induction circuit forms at 200-500 at the proxy
    # shape, depending on the seed), checked every 50, stopped once solved; the tasks that
    # are not solved at this budget (fuzzy recall, copying, compression) 200; memorisation 50.
    steps: int = spec(600, ge=1, le=10**7, help="training steps per task and grid point")
    batch_size: int = spec(32, ge=1, le=2**16, help="training sequences per step")
    lrs: tuple[float, ...] = spec((1e-3,), gt=0, le=10.0, each=True, help="learning-rate grid")
    weight_decays: tuple[float, ...] = spec(
        (0.0,), ge=0, le=100.0, each=True, help="weight-decay grid"
    )
    warmup_steps: int = spec(10, ge=0, le=10**7)
    # wsd: the learning rate stays at its peak until the last fifth of the steps. With a
    # cosine decay the recall tasks' induction circuit formed later or not at all within the
    # budget (the rate had fallen by the time it would form; docs/proxies.md).
    schedule: str = spec("wsd", choices=SCHEDULES, help="MAD/MQAR learning-rate schedule")
    grad_clip: float = spec(1.0, ge=0, help="gradient-norm clip (0: none)")
    eval_batch_size: int = spec(256, ge=1, le=2**16)
    dtype: str = spec("fp32", choices=DTYPES, help="autocast dtype")
    threads: int = spec(1, ge=0, le=4096, help="torch threads (0: leave torch's setting)")
    seed: int = spec(0, ge=0, le=MAX_SEED, help="data, initialisation and batch-order seed")
    stop_when_perfect: bool = spec(True, help="skip the rest of a task's grid once solved")
    task_steps: tuple[tuple[str, int], ...] = spec(
        (
            ("fuzzy_in_context_recall", 200),
            ("selective_copying", 200),
            ("compression", 200),
            ("memorization", 50),
        ),
        accepts=tuple[tuple[str, int], ...] | dict[str, int],
        help="[task, steps] pairs: a task's steps below `steps`",
    )
    # Noisy recall trains on batches of 64: at 32 the induction circuit of AFAFAF formed on
    # about 4 of 10 initialisations within 600 steps, at 64 on 5 of 6 (docs/history/results-log.md,
    # calibration round 3). Fuzzy recall stays at 32: at 64 (or 300 steps) Mamba-2 patterns start to
    # solve it on some seeds and not others (AFSAFS 0.48-0.93), a new source of seed noise.
    task_batch_sizes: tuple[tuple[str, int], ...] = spec(
        (("noisy_in_context_recall", 64),),
        accepts=tuple[tuple[str, int], ...] | dict[str, int],
        help="[task, batch size] pairs: a task's batch size instead of `batch_size`",
    )
    check_every: int = spec(50, ge=0, le=10**7, unit="steps", help="validation every N steps")
    solved_accuracy: float = spec(0.99, gt=0, le=1.0, help="validation accuracy that stops a run")
    # A run that gains less than 0.05 validation accuracy over 6 checks (300 steps) has
    # stalled: a non-learner (FFFFFF on recall) stops there instead of running its 600
    # steps, and a learner stuck on the plateau is restarted, up to twice: with one restart
    # AFSAFS's noisy recall stalled on both tries on seed 2 and solved on the third
    # (docs/proxies.md, "Stalls and restarts"; docs/history/results-log.md, round 4).
    patience: int = spec(6, ge=0, le=10**6, help="checks without a gain of min_delta: a stall")
    min_delta: float = spec(0.05, ge=0, le=1.0, help="the accuracy gain that is progress")
    restarts: int = spec(2, ge=0, le=100, help="new starts of a stalled run per grid point")
    mad_tasks: tuple[MADTaskConfig, ...] = spec(factory=_default_mad)
    mqar_tasks: tuple[MQARConfig, ...] = spec(DEFAULT_MQAR)
    text_tokens: int = spec(262_144, ge=1, le=10**12, unit="tokens")
    text_seq_len: int = spec(128, ge=1, le=2**20, unit="tokens")
    text_batch_size: int = spec(16, ge=1, le=2**16)
    text_lr: float = spec(3e-3, gt=0, le=10.0, help="the text proxy's learning rate")
    text_eval_tokens: int = spec(32_768, ge=1, le=10**12, unit="tokens")
    tokenizer: str = spec("byte", help="the text proxy's tokenizer")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "weight_decays", tuple(float(v) for v in self.weight_decays))
        object.__setattr__(self, "mad_tasks", tuple(self.mad_tasks))
        object.__setattr__(self, "mqar_tasks", tuple(self.mqar_tasks))
        if not self.lrs or not self.weight_decays:
            raise UserError("proxy config: lrs and weight_decays need at least one value each")
        for name, what in (("task_steps", "step counts"), ("task_batch_sizes", "batch sizes")):
            given = getattr(self, name)
            pairs = given.items() if isinstance(given, dict) else given
            object.__setattr__(self, name, tuple((str(k), int(v)) for k, v in pairs))
            bad = sorted(k for k, _ in getattr(self, name) if k not in MAD_TASKS)
            if bad or any(v < 1 for _, v in getattr(self, name)):
                raise UserError(
                    f"proxy config: {name} takes MAD task names ({', '.join(MAD_TASKS)}) "
                    f"and {what} >= 1; got {getattr(self, name)}"
                )

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "mad_tasks" in data and "restarts" not in data:
            # A whole config written before restarts and per-task batch sizes existed
            # (a search or run folder resumed): it keeps the behaviour it was run with.
            return {**data, "restarts": 0, "task_batch_sizes": data.get("task_batch_sizes", [])}
        return data

    def task_run(self, task: str, lr: float, weight_decay: float, seed: int) -> TaskRun:
        """How one grid point of ``task`` is trained under this config."""
        return TaskRun(
            lr=lr, weight_decay=weight_decay, steps=self.steps_for(task),
            batch_size=self.batch_for(task), warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip, dtype=self.dtype, seed=seed,
            eval_batch_size=self.eval_batch_size, check_every=self.check_every,
            schedule=self.schedule,
        )  # fmt: skip

    def steps_for(self, task: str) -> int:
        """Training steps of one task: ``steps``, capped by ``task_steps``."""
        return min(self.steps, dict(self.task_steps).get(task, self.steps))

    def batch_for(self, task: str) -> int:
        """Training batch size of one task: ``task_batch_sizes``' entry, else ``batch_size``."""
        return dict(self.task_batch_sizes).get(task, self.batch_size)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(stamp(self.to_dict()), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ProxyConfig:
        return load_config(cls, text_or_path, "proxy config")
