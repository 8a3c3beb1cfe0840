"""What decides a training run (``TrainConfig``, each field declared once) and what it returns
(``TrainResult``); the vocabulary rule that fits a shape to its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hcomposer.architecture import Architecture
from hcomposer.config_io import Config
from hcomposer.data import Tokenizer
from hcomposer.errors import UserError
from hcomposer.fields import spec
from hcomposer.guards import MAX_SEED
from hcomposer.training.schedule import SCHEDULES
from hcomposer.training.step import DTYPES

__all__ = ["TrainConfig", "TrainResult", "RESUMABLE_CHANGES", "vocab_for", "resolve_arch"]

# Fields that may change when a run is resumed (they do not change the numbers).
RESUMABLE_CHANGES = {
    "compile",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "eval_tokens",
    "device",
    "fsdp",
    "threads",
    "batch_threads",
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """Everything that decides a training run. Frozen, keyword-only, JSON round trip.

    Each field's help, range and choices are declared on it (``hcomposer.fields.spec``): the
    constructor, JSON files and ``hcomposer train``'s options are all checked against them.
    """

    _what: ClassVar[str] = "train config"

    tokens: int = spec(1_000_000, ge=1, cap="tokens", unit="tokens", help="training tokens")
    batch_size: int = spec(16, ge=1, le=2**20, help="global sequences per optimiser step")
    seq_len: int = spec(256, ge=1, le=2**24, unit="tokens", help="training sequence length")
    lr: float = spec(1e-3, gt=0, le=10.0, help="peak learning rate")
    min_lr: float = spec(1e-4, ge=0, le=10.0, help="learning rate at the end of the decay")
    # Below 1: a fraction of the optimiser steps; otherwise a number of steps.
    warmup: float = spec(0.05, ge=0, le=10**9, help="warmup: a fraction (<1) or steps")
    schedule: str = spec("cosine", choices=SCHEDULES, help="learning-rate schedule")
    decay_fraction: float = spec(0.2, ge=0, le=1.0, help="wsd: share of the steps that decay")
    weight_decay: float = spec(0.1, ge=0, le=100.0, help="AdamW weight decay (matrices only)")
    betas: tuple[float, float] = spec((0.9, 0.95), ge=0, le=1.0, each=True, help="AdamW betas")
    grad_clip: float = spec(1.0, ge=0, help="gradient-norm clip (0: none)")
    grad_accum: int = spec(1, ge=1, le=2**16, help="micro-steps per optimiser step")
    # auto: bf16 where the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32.
    dtype: str = spec("auto", choices=DTYPES, help="autocast dtype")
    compile: bool = spec(False, help="torch.compile the model")
    eval_every: int = spec(
        200, ge=0, le=2**40, unit="steps", help="validation every N steps (0: at the end)"
    )
    eval_tokens: int = spec(65536, ge=1, le=10**12, unit="tokens", help="validation tokens")
    log_every: int = spec(10, ge=1, le=2**40, unit="steps", help="metrics line every N steps")
    checkpoint_every: int = spec(500, ge=0, le=2**40, unit="steps", help="checkpoint every N steps")
    seed: int = spec(0, ge=0, le=MAX_SEED, help="data order and initialisation seed")
    data: str | None = spec(None, help="text, token shards or hf:NAME (None: the embedded corpus)")
    tokenizer: str = spec("byte", help="byte, bpe:N or a tokenizer.json")
    val_fraction: float = spec(0.02, gt=0, le=0.5, help="share of the data held out")
    device: str = spec("auto", help="auto, cpu, cuda, cuda:N or mps")
    # Shard parameters, gradients and optimiser state over the torchrun processes (FSDP2).
    fsdp: bool = spec(False, help="FSDP2 over the torchrun processes")
    # CPU threads: None leaves torch's setting; 0 adapts to the load; N fixes N.
    threads: int | None = spec(None, ge=0, le=4096, help="CPU threads (None: leave; 0: adapt)")
    # Row slices of each micro-batch trained concurrently, one thread each (1: no split).
    batch_threads: int = spec(1, ge=1, le=4096, help="concurrent row slices per micro-batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._check_batch_threads()
        if self.min_lr > self.lr:
            raise UserError(
                f"train config: min_lr {self.min_lr:g} is above lr {self.lr:g}; "
                "need 0 <= min_lr <= lr"
            )
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"train config: batch size {self.batch_size} does not split into "
                f"{self.grad_accum} accumulation steps"
            )
        if self.tokens < self.batch_size * self.seq_len:
            raise UserError(
                f"train config: --tokens {self.tokens} is less than one batch "
                f"({self.batch_size} x {self.seq_len} tokens)"
            )

    def _check_batch_threads(self) -> None:
        n = self.batch_threads
        if n == 1:
            return
        if self.threads not in (None, 0, 1):
            raise UserError(
                f"train config: batch_threads {n} runs one intra-op thread per batch thread; "
                f"threads must be 0 or 1, got {self.threads}"
            )
        for flag in ("compile", "fsdp"):
            if getattr(self, flag):
                raise UserError(f"train config: batch_threads {n} does not work with {flag}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class TrainResult:
    """What ``train`` returns (also written as summary.json / status.json)."""

    out_dir: Path
    status: str
    step: int
    tokens: int
    loss: float | None
    val_loss: float | None
    wall_seconds: float
    tokens_per_second: float
    params_total: int
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        # A blown-up loss has no finite perplexity: None keeps summary.json standard JSON
        # (exp overflows above ~709 and would crash the run's last write).
        v = self.val_loss
        d["val_ppl"] = math.exp(v) if v is not None and math.isfinite(v) and v < 700 else None
        return d


def vocab_for(tokenizer: Tokenizer) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 64 (friendlier matmul sizes)."""
    return -(-tokenizer.vocab_size // 64) * 64


def resolve_arch(arch: Architecture, tokenizer: Tokenizer, seq_len: int) -> Architecture:
    """Set the shape's vocabulary from the tokenizer when they differ, and make room for seq_len."""
    shape = arch.shape
    changes: dict[str, Any] = {}
    if shape.vocab_size not in (tokenizer.vocab_size, vocab_for(tokenizer)):
        changes["vocab_size"] = vocab_for(tokenizer)
    if shape.max_seq_len < seq_len:
        changes["max_seq_len"] = seq_len
    return arch.with_shape(shape.replace(**changes)) if changes else arch
