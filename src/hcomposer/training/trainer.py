"""The trainer: AdamW, warmup-cosine / WSD, bf16 autocast, accumulation, DDP, exact resume.

A run folder holds ``run.json`` (resolved config + version, git revision, command),
``architecture.json``, ``tokenizer/``, ``metrics.jsonl``, ``checkpoint/`` (see
``hcomposer.checkpoint``), ``status.json`` and, when done, ``summary.json``.

Choices (documented in docs/data_and_training.md):

- Weight decay applies to matrices only (Linear and conv weights); norms, biases, SSM
  scalars (A, D, dt) and the embedding (tied or not) are not decayed.
- ``batch_size`` is the global number of sequences per optimiser step. It is split over
  ``world_size`` processes and ``grad_accum`` micro-steps; the rows each process sees are a
  fixed slice of the same global batch, so the loss does not depend on how it is split.
- Batch ``k`` is a pure function of (seed, k) and the schedule a pure function of k, so a
  resumed run reproduces the uninterrupted one exactly (in fp32; bf16 too on the same host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hcomposer.architecture import Architecture
from hcomposer.checkpoint import (
    check_out_dir,
    find_checkpoint,
    load_checkpoint,
    read_state,
    read_status,
    save_checkpoint,
    truncate_metrics,
    write_status,
)
from hcomposer.data import (
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    prepare_dataset,
    resolve_source,
)
from hcomposer.errors import UserError
from hcomposer.io import append_jsonl, atomic_write_json, read_json, record_run
from hcomposer.model import HybridLM, build_model
from hcomposer.schedule import SCHEDULES, lr_at

__all__ = ["TrainConfig", "TrainResult", "train", "load_run", "vocab_for", "resolve_arch"]

# Fields that may change when a run is resumed (they do not change the numbers).
_RESUMABLE_CHANGES = {
    "compile",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "eval_tokens",
    "device",
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that decides a training run. Frozen, keyword-only, JSON round trip."""

    tokens: int = 1_000_000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    # Below 1: a fraction of the optimiser steps; otherwise a number of steps.
    warmup: float = 0.05
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: str = "bf16"
    compile: bool = False
    eval_every: int = 200
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 500
    seed: int = 0
    data: str | None = None
    tokenizer: str = "byte"
    val_fraction: float = 0.02
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        positive = ("tokens", "batch_size", "seq_len", "grad_accum", "eval_tokens", "log_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"train config: {name} must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train config: schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.dtype not in ("bf16", "fp32"):
            raise UserError(f"train config: dtype {self.dtype!r}; choose bf16 or fp32")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError("train config: need lr > 0 and 0 <= min_lr <= lr")
        if self.tokens < self.batch_size * self.seq_len:
            raise UserError(
                f"train config: --tokens {self.tokens} is less than one batch "
                f"({self.batch_size} x {self.seq_len} tokens)"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"train config: unknown field(s) {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


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
        d["val_ppl"] = math.exp(self.val_loss) if self.val_loss is not None else None
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


def _device(spec: str, local_rank: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _param_groups(model: HybridLM, weight_decay: float) -> list[dict[str, Any]]:
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _Dist:
    """torchrun's environment: rank, world size, and the collectives the trainer needs."""

    def __init__(self, device_spec: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(device_spec, self.local_rank)
        self.enabled = self.world > 1
        self.owns_group = False
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend=backend)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _evaluate(model: HybridLM, dataset, config: TrainConfig, device, micro: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in dataset.eval_batches(micro, config.seq_len, config.eval_tokens):
        x, y = x.to(device), y.to(device)
        with _autocast(device, config.dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


def _progress(enabled: bool):
    from hcomposer.format import progress_bar

    return progress_bar(enabled, field="info")


def train(
    arch: Architecture,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    argv: list[str] | None = None,
) -> TrainResult:
    """Train ``arch`` on ``config.data`` into ``out_dir`` (see the module docstring).

    ``stop_at`` ends the run after that many optimiser steps (a checkpoint is written), as a
    kill would, leaving status ``running`` for a later ``resume=True``.
    """
    out = Path(out_dir)
    dist = _Dist(config.device)
    try:
        return _train(arch, config, out, dist, resume, progress, stop_at, argv)
    finally:
        dist.close()


def _train(arch, config, out, dist, resume, progress, stop_at, argv) -> TrainResult:
    # Every check that can fail on bad input runs before anything is written.
    has_run = check_out_dir(out, arch, config.to_dict(), resume, _RESUMABLE_CHANGES)
    if has_run:
        tokenizer = load_tokenizer(out / "tokenizer")
        arch = Architecture.from_json(out / "architecture.json")
    else:
        tokenizer = get_tokenizer(config.tokenizer, source=config.data)
        arch = resolve_arch(arch, tokenizer, config.seq_len)
    ckpt = find_checkpoint(out) if has_run else None
    if ckpt is not None:
        # A truncated or tampered checkpoint is refused here, before anything is written.
        read_state(ckpt)
    micro, rem = divmod(config.batch_size, dist.world * config.grad_accum)
    if rem or micro == 0:
        raise UserError(
            f"batch size {config.batch_size} does not split into {dist.world} process(es) x "
            f"{config.grad_accum} accumulation steps"
        )
    if config.data is None or not (Path(config.data) / "manifest.json").is_file():
        # Every rank checks the source, so bad input fails everywhere, not only on rank 0.
        resolve_source(config.data)
    # Rank 0 tokenises (or finds the shards); the others then open the same shards.
    if dist.main:
        dataset = prepare_dataset(config.data, tokenizer, None, config.val_fraction, config.seed)
    dist.barrier()
    if not dist.main:
        dataset = prepare_dataset(config.data, tokenizer, None, config.val_fraction, config.seed)
    for split in ("train", "val"):
        dataset._check_len(dataset.split(split), split, config.seq_len)
    if has_run:
        started_on = read_json(out / "run.json")["config"].get("dataset", {}).get("sha256")
        if started_on is not None and started_on != dataset.manifest["sha256"]:
            raise UserError(
                f"--resume: the data of the run in {str(out)!r} changed since it started "
                "(token shard checksums differ); restore the data or start a new run"
            )

    device = dist.device
    if config.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bf16; pass --dtype fp32")
    model = build_model(arch, device=device, seed=config.seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=config.betas,
        fused=device.type == "cuda",
    )
    start_step = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start_step = int(state["step"])
    else:
        torch.manual_seed(config.seed + dist.rank)
    total = config.total_steps
    params_total = sum(p.numel() for p in model.parameters())
    if start_step >= total and (out / "summary.json").is_file():
        # Nothing left to do: report the finished run, change nothing.
        done = read_json(out / "summary.json")
        done["out_dir"] = out
        done.pop("val_ppl", None)
        return TrainResult(**done)

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if not has_run:
            # run.json last: a folder with run.json always has the tokenizer and architecture.
            tokenizer.save(out / "tokenizer")
            atomic_write_json(out / "architecture.json", arch.to_dict())
            dataset_info = {**dataset.manifest, "path": str(dataset.path)}
            run_config = {
                "architecture": arch.to_dict(),
                "train": config.to_dict(),
                "dataset": dataset_info,
            }
            record_run(out, run_config, argv)
        truncate_metrics(out / "metrics.jsonl", start_step)
        write_status(out, "running", start_step, f"training from step {start_step}")
    dist.barrier()

    net: torch.nn.Module = model
    if config.compile:
        net = torch.compile(model)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    model.train()

    def checkpoint(step: int) -> None:
        if dist.main:
            save_checkpoint(
                out,
                model,
                optimizer,
                {
                    "step": step,
                    "tokens": step * config.tokens_per_step,
                    "data": {"seed": config.seed, "next_batch": step},
                    "total_steps": total,
                },
            )
        dist.barrier()

    rows = slice(dist.rank * micro * config.grad_accum, (dist.rank + 1) * micro * config.grad_accum)
    end = total if stop_at is None else min(total, stop_at)
    t_start = t_log = time.perf_counter()
    last_loss = last_val = None
    since_log = 0
    step = start_step
    status, message = "running", ""
    with _progress(progress and dist.main) as bar:
        task = bar.add_task("train", total=total, completed=start_step, info="")
        while step < end:
            lr = lr_at(
                step,
                total_steps=total,
                lr=config.lr,
                min_lr=config.min_lr,
                warmup=config.warmup,
                schedule=config.schedule,
                decay_fraction=config.decay_fraction,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_all, y_all = dataset.batch_at(
                "train", step, config.batch_size, config.seq_len, seed=config.seed
            )
            x_all, y_all = x_all[rows].to(device), y_all[rows].to(device)
            loss_sum = torch.zeros((), device=device)
            for k in range(config.grad_accum):
                x, y = x_all[k * micro : (k + 1) * micro], y_all[k * micro : (k + 1) * micro]
                sync = k == config.grad_accum - 1 or not dist.enabled
                ctx = contextlib.nullcontext() if sync else net.no_sync()
                with ctx:
                    with _autocast(device, config.dtype):
                        logits = net(x)
                        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / config.grad_accum).backward()
                loss_sum += loss.detach()
            step_loss = float(dist.mean(loss_sum / config.grad_accum))
            if not math.isfinite(step_loss):
                status, message = "diverged", f"diverged at step {step + 1}"
                step += 1
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            since_log += 1
            last_loss = step_loss
            record = None
            if step % config.log_every == 0 or step == end:
                now = time.perf_counter()
                tps = since_log * config.tokens_per_step / max(now - t_log, 1e-9)
                t_log, since_log = now, 0
                record = {
                    "step": step,
                    "tokens": step * config.tokens_per_step,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tps,
                }
                bar.update(task, info=f"loss {step_loss:.4f}  {tps:,.0f} tok/s")
            if (config.eval_every and step % config.eval_every == 0) or step == total:
                if dist.main:
                    last_val = _evaluate(model, dataset, config, device, micro)
                record = record or {
                    "step": step,
                    "tokens": step * config.tokens_per_step,
                    "loss": step_loss,
                    "lr": lr,
                }
                record["val_loss"] = last_val
            if record is not None and dist.main:
                append_jsonl(out / "metrics.jsonl", record)
            bar.update(task, completed=step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
                checkpoint(step)
    wall = time.perf_counter() - t_start
    tps = (step - start_step) * config.tokens_per_step / max(wall, 1e-9)
    if status == "diverged":
        if dist.main:
            write_status(out, "diverged", step, message)
    else:
        checkpoint(step)
        if step >= total:
            status, message = "completed", f"completed {step} steps"
        else:
            message = f"stopped at step {step} of {total}; resume to continue"
        if dist.main:
            write_status(out, status, step, message)
    result = TrainResult(
        out_dir=out,
        status=status,
        step=step,
        tokens=step * config.tokens_per_step,
        loss=last_loss,
        val_loss=last_val,
        wall_seconds=wall,
        tokens_per_second=tps,
        params_total=params_total,
        message=message,
    )
    if dist.main:
        atomic_write_json(out / "summary.json", result.to_dict())
    dist.barrier()
    return result


def load_run(run_dir: str | Path, *, device: Any = None):
    """``(model, arch, tokenizer, info)`` from a run folder's latest checkpoint (UserError if none).

    ``info`` holds the config, the checkpoint's step and tokens, status and summary.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "architecture.json").is_file():
        raise UserError(f"{str(run_dir)!r} is not an hcomposer run folder (no architecture.json)")
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"run folder {str(run_dir)!r} holds no checkpoint yet")
    arch = Architecture.from_json(run_dir / "architecture.json")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = build_model(arch, device=device or "cpu")
    state = load_checkpoint(ckpt, model, restore_rng=False)
    model.eval()
    info = {
        "step": state["step"],
        "tokens": state["tokens"],
        "config": read_json(run_dir / "run.json").get("config", {}),
        "status": read_status(run_dir),
        "summary": read_json(run_dir / "summary.json")
        if (run_dir / "summary.json").is_file()
        else None,
    }
    return model, arch, tokenizer, info
