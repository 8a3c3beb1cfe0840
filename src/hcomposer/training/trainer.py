"""The trainer: AdamW, warmup-cosine / WSD, bf16 autocast, accumulation, DDP, exact resume.

The run folder's files are listed in ``hcomposer.runs``; the step, the evaluation loop and
the parameter groups are ``hcomposer.training.step``'s, shared with the proxies.

Choices (documented in docs/data_and_training.md):

- Weight decay applies to matrices only (Linear and conv weights); norms, biases, SSM
  scalars (A, D, dt) and the embedding (tied or not) are not decayed.
- ``batch_size`` is the global number of sequences per optimiser step. It is split over
  ``world_size`` processes and ``grad_accum`` micro-steps; the rows each process sees are a
  fixed slice of the same global batch, so the loss does not depend on how it is split.
- Batch ``k`` is a pure function of (seed, k) and the schedule a pure function of k, so a
  resumed run reproduces the uninterrupted one exactly (in fp32; bf16 too on the same host).
- ``threads``: None leaves torch's CPU thread count alone (library callers); 0 adapts it to
  the load (``hcomposer train``'s default, :class:`hcomposer.threads.AdaptiveThreads`, unless
  ``OMP_NUM_THREADS`` is set or the run is distributed); N fixes it. The previous count is
  restored when ``train`` returns. Some kernels may sum in another order with another thread
  count: for a bitwise-exact resume, fix the count.
- ``batch_threads`` N > 1 splits each micro-batch into N row slices trained concurrently in N
  threads (``train_step``'s split path) with one intra-op thread each: the threads then wait
  for each other once per micro-batch instead of at every op. ``threads`` must be 0 (the
  count is then fixed at 1, not adapted) or 1. Refused under DDP/FSDP, with ``compile`` and
  for models with MoE layers (their forward updates routing state the threads would share).
  The gradients equal the unsplit ones up to rounding (tests/test_split_step.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file
from hcomposer.data import load_tokenizer
from hcomposer.errors import UserError
from hcomposer.format import progress_bar
from hcomposer.model import build_model, lm_loss
from hcomposer.runs import RUN_JSON, FolderLock, RunDir
from hcomposer.threads import THREADS_EVERY, AdaptiveThreads, adapts
from hcomposer.tracking import Tracking, open_tracking
from hcomposer.training.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    set_aside_damaged,
    usable_checkpoint,
)
from hcomposer.training.config import TrainConfig, TrainResult, resolve_arch, vocab_for
from hcomposer.training.data_feed import data_state, micro_batches, restore_data
from hcomposer.training.distributed import Distributed
from hcomposer.training.meter import Meter
from hcomposer.training.objective import Objective
from hcomposer.training.preflight import check_inputs
from hcomposer.training.schedule import lr_at
from hcomposer.training.step import (
    evaluate,
    make_optimizer,
    resolve_dtype,
    set_lr,
    train_step,
)

__all__ = [
    "Objective",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train",
    "load_run",
    "vocab_for",
    "resolve_arch",
]


def _progress(enabled: bool):
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
    report_to: Sequence[str] = (),
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``arch`` on ``config.data`` into ``out_dir`` (see the module docstring).

    ``stop_at`` ends the run after that many optimiser steps (a checkpoint is written), as a
    kill would, leaving status ``running`` for a later ``resume=True``. ``report_to``: the
    experiment trackers each metrics record also goes to (``hcomposer.tracking``).
    ``objective`` replaces the LM loss (see :class:`Objective`); validation stays the LM loss.
    """
    out = Path(out_dir)
    dist = Distributed(config.device)
    threads = torch.get_num_threads()
    trainer = None
    try:
        # A second process on this folder is refused (rank 0 holds it for the whole run).
        with FolderLock(out, argv=argv, enabled=dist.main):
            # The loop: every step, log, evaluation and checkpoint goes through the Trainer.
            trainer = Trainer(
                arch,
                config,
                out,
                dist=dist,
                resume=resume,
                argv=argv,
                report_to=report_to,
                objective=objective,
            )
            done = trainer.setup()
            return done if done is not None else _train(trainer, stop_at, progress)
    finally:
        if trainer is not None:
            # After an error: the trackers' runs are closed as failed (no-op once finished).
            trainer.tracking.finish(ok=False)
        torch.set_num_threads(threads)
        dist.close()


def _train(trainer: Trainer, stop_at: int | None, progress: bool) -> TrainResult:
    config, dist = trainer.config, trainer.dist
    total = config.total_steps
    start_step = trainer.start_step
    end = total if stop_at is None else min(total, stop_at)
    t_start = t_log = time.perf_counter()
    last_loss = last_val = None
    since_log = 0
    step = start_step
    status, message = "running", ""
    with _progress(progress and dist.main) as bar:
        task = bar.add_task("train", total=total, completed=start_step, info="")
        while step < end:
            lr = trainer.lr(step)
            step_loss, grad_norm = trainer.step(step)
            if grad_norm is None:
                status, message = "diverged", f"diverged at step {step + 1}"
                step += 1
                break
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
                    "mfu": trainer.meter.mfu(tps / dist.world),
                    "peak_mem_mib": trainer.meter.peak_mem_mib(),
                    "threads": torch.get_num_threads(),
                }
                bar.update(task, info=f"loss {step_loss:.4f}  {tps:,.0f} tok/s")
            if (config.eval_every and step % config.eval_every == 0) or step == total:
                # A sharded model's forward needs every rank (each gathers the weights).
                if dist.main or config.fsdp:
                    last_val = trainer.evaluate()
                record = record or {
                    "step": step,
                    "tokens": step * config.tokens_per_step,
                    "loss": step_loss,
                    "lr": lr,
                }
                record["val_loss"] = last_val
            if record is not None and dist.main:
                trainer.run_dir.append_metrics(record)
                trainer.tracking.log_record(record)
            if step % THREADS_EVERY == 0:
                # After the record: a logged count is the one its steps ran with.
                trainer.adapt_threads()
            bar.update(task, completed=step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
                trainer.checkpoint(step)
    wall = time.perf_counter() - t_start
    tps = (step - start_step) * config.tokens_per_step / max(wall, 1e-9)
    return trainer.finish(
        status, step, message, loss=last_loss, val_loss=last_val, wall_seconds=wall,
        tokens_per_second=tps,
    )  # fmt: skip


class Trainer:
    """One training run: :meth:`setup`, then :meth:`step` / :meth:`evaluate` /
    :meth:`checkpoint` in a loop, then :meth:`finish` (``train`` drives it).

    The constructor checks everything (``preflight.check_inputs``) before anything is
    written; :meth:`setup` builds the model and optimiser, restores the checkpoint and
    writes the run folder's first files.
    """

    def __init__(
        self,
        arch: Architecture,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        dist: Distributed,
        resume: bool = False,
        argv: list[str] | None = None,
        report_to: Sequence[str] = (),
        objective: Objective | None = None,
    ):
        self.config, self.dist, self.argv = config, dist, argv
        self.run_dir = RunDir(out_dir)
        self.device = dist.device
        self.objective = objective
        if objective is not None and (dist.enabled or config.compile):
            raise UserError(
                "a distillation run trains in one process without --compile for now; "
                "drop torchrun/--compile"
            )
        checked = check_inputs(arch, config, self.run_dir.root, dist, resume)
        self.has_run, self.tokenizer, self.arch, self.ckpt, self.micro, self.dataset = checked
        if objective is not None:
            objective.check(self.arch, self.tokenizer)
            self._check_objective_on_resume()
        self.adaptive: AdaptiveThreads | None = None
        self.report_to = tuple(report_to)
        self.tracking = Tracking()

    def _check_objective_on_resume(self) -> None:
        if not self.has_run:
            return
        stored = read_run_file(self.run_dir.root, RUN_JSON, keys=("config",), versioned=True)
        if stored["config"].get("objective") != json.loads(json.dumps(self.objective.record())):
            raise UserError(
                f"--resume: the run in {str(self.run_dir.root)!r} was started with another "
                "objective (teacher, layers or loss weights); repeat the original options or "
                "choose another --out"
            )

    def setup(self) -> TrainResult | None:
        """Build the model and optimiser, restore the checkpoint, write the run's first files.

        Returns the stored result when the run had already finished (nothing is changed).
        """
        config, dist, run = self.config, self.dist, self.run_dir
        device = self.device
        self.start_step = 0
        threads = self._set_threads()
        model = self._build()
        if self.ckpt is not None:
            # One path for one process, DDP and FSDP (each rank keeps its shard).
            state = load_checkpoint(self.ckpt, model, self.optimizer)
            self.start_step = int(state["step"])
            restore_data(self.dataset, state.get("data", {}))
            if dist.main and self.ckpt != run.checkpoint:
                set_aside_damaged(run.root)  # the next save keeps the good one as previous
        else:
            torch.manual_seed(config.seed + dist.rank)
        self.params_total = sum(p.numel() for p in model.parameters())
        if self.start_step >= config.total_steps and run.summary_json.is_file():
            # Nothing left to do: report the finished run, change nothing.
            done = read_run_file(run.root, run.summary_json.name)
            fields = {f.name for f in dataclasses.fields(TrainResult)}
            if not fields - {"message"} <= set(done):
                raise UserError(
                    f"run folder {str(run.root)!r} is damaged: summary.json lacks fields; "
                    "delete summary.json and resume to write it again"
                )
            done = {k: v for k, v in done.items() if k in fields}
            done["out_dir"] = run.root
            return TrainResult(**done)
        if dist.main:
            run.root.mkdir(parents=True, exist_ok=True)
            if not self.has_run:
                # run.json last: a folder with run.json always has the tokenizer and architecture.
                self.tokenizer.save(run.tokenizer)
                run.write_architecture(self.arch)
                dataset_info = {**self.dataset.manifest, "path": str(self.dataset.path)}
                run.record(
                    {
                        "architecture": self.arch.to_dict(),
                        "train": config.to_dict(),
                        "precision": resolve_dtype(config.dtype, device),
                        "dataset": dataset_info,
                        "threads": threads,
                        "batch_threads": config.batch_threads,
                        **(
                            {"objective": self.objective.record()}
                            if self.objective is not None
                            else {}
                        ),
                    },
                    self.argv,
                )
            run.truncate_metrics(self.start_step)
            run.write_status("running", self.start_step, f"training from step {self.start_step}")
            self.tracking = open_tracking(
                self.report_to, run.tracking, run_name="/".join(run.root.resolve().parts[-2:]),
                params=run.read_run().get("config"),
                resume_step=self.start_step if self.has_run else None,
            )  # fmt: skip
        self.meter = Meter(self.arch, config.seq_len, device, resolve_dtype(config.dtype, device))
        dist.barrier()
        net: torch.nn.Module = model
        if config.compile:
            net = torch.compile(model)
        if dist.enabled and not config.fsdp:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.net = net
        model.train()
        per_rank = self.micro * config.grad_accum
        self.rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        return None

    def _build(self) -> torch.nn.Module:
        """The model from the seed (sharded under ``fsdp``) and its optimiser; returns the model."""
        config, device = self.config, self.device
        if config.fsdp:
            # Imported here: torch's FSDP modules cost about a second of start-up CPU time
            # that runs without --fsdp should not pay.
            from hcomposer.training import fsdp

            self.fsdp = fsdp
            # Built whole on the host (the same initial weights as DDP), then sharded onto
            # the device; the optimiser is created over the shards.
            model = build_model(self.arch, device="cpu", seed=config.seed)
            model = fsdp.shard_model(model, device)
        else:
            model = build_model(self.arch, device=device, seed=config.seed)
        if self.objective is not None:
            self.objective.prepare(model, device)
        self.model = model
        self.optimizer = make_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
            device=None if config.fsdp else device,
        )  # fmt: skip
        return model

    def _set_threads(self) -> str | int:
        """Apply ``config.threads``; what run.json records: "adaptive" or the count in use."""
        wanted = self.config.threads
        if self.config.batch_threads > 1:
            # One intra-op thread per batch thread: the split replaces intra-op parallelism.
            torch.set_num_threads(1)
        elif wanted:
            torch.set_num_threads(wanted)
        elif wanted == 0 and adapts("train"):
            self.adaptive = AdaptiveThreads(torch.set_num_threads, torch.get_num_threads())
            # None without /proc: torch keeps its default.
            if self.adaptive.start() is not None:
                return "adaptive"
            self.adaptive = None
        return torch.get_num_threads()

    def adapt_threads(self) -> None:
        """Re-check the load and change the thread count if it calls for another one."""
        if self.adaptive is not None:
            self.adaptive.update()

    def lr(self, step: int) -> float:
        config = self.config
        return lr_at(
            step,
            total_steps=config.total_steps,
            lr=config.lr,
            min_lr=config.min_lr,
            warmup=config.warmup,
            schedule=config.schedule,
            decay_fraction=config.decay_fraction,
        )

    def step(self, step: int) -> tuple[float, float | None]:
        """Optimiser step ``step`` (0-based) on batch ``step``: ``(loss, grad_norm)``;
        ``grad_norm`` is None when the loss was not finite (nothing was updated)."""
        config, micro = self.config, self.micro
        set_lr(self.optimizer, self.lr(step))
        batches = micro_batches(self.dataset, step, config, self.rows, micro, self.device)
        net = self.net
        no_sync = None
        if config.fsdp:
            fsdp, model = self.fsdp, self.model
            no_sync = lambda: fsdp.no_gradient_sync(model)  # noqa: E731

            def loss_fn(x, y):
                # FSDP does not synchronise buffers: rank 0's go out before every forward.
                fsdp.sync_buffers(model)
                return lm_loss(net(x), y)
        else:
            if self.dist.enabled:
                no_sync = net.no_sync

            def loss_fn(x, y):
                if self.objective is not None:
                    return self.objective.loss(net, x, y)
                # Through ``net`` (compiled and/or DDP-wrapped), with HybridLM.loss's loss.
                return lm_loss(net(x), y)

        return train_step(
            loss_fn,
            batches,
            self.optimizer,
            device=self.device,
            dtype=config.dtype,
            grad_clip=config.grad_clip,
            no_sync=no_sync,
            reduce=self.dist.mean,
            batch_threads=config.batch_threads,
        )

    def evaluate(self) -> float:
        """Mean next-token loss over the first ``eval_tokens`` tokens of the validation split."""
        config, model = self.config, self.model
        batches = self.dataset.eval_batches(self.micro, config.seq_len, config.eval_tokens)
        result = evaluate(
            lambda x, y: (model(x), y), batches, device=self.device, dtype=config.dtype,
            modules=[model],
        )  # fmt: skip
        return result.loss if result.count else 0.0

    def checkpoint(self, step: int) -> None:
        config, dist = self.config, self.dist
        record = {
            "step": step,
            "tokens": step * config.tokens_per_step,
            "data": data_state(self.dataset, config, step),
            "total_steps": config.total_steps,
        }
        # Every rank takes part: under FSDP each writes its own shards (nothing is gathered);
        # otherwise rank 0 writes the whole state.
        save_checkpoint(
            self.run_dir.root, self.model, self.optimizer, record, sharded_files=config.fsdp
        )
        dist.barrier()

    def finish(self, status: str, step: int, message: str, **result: Any) -> TrainResult:
        """Write status.json and summary.json (the last checkpoint is written unless diverged)."""
        config, dist, run = self.config, self.dist, self.run_dir
        if status != "diverged":
            self.checkpoint(step)
            if step >= config.total_steps:
                status, message = "completed", f"completed {step} steps"
            else:
                message = f"stopped at step {step} of {config.total_steps}; resume to continue"
        if dist.main:
            run.write_status(status, step, message)
        out = TrainResult(
            out_dir=run.root,
            status=status,
            step=step,
            tokens=step * config.tokens_per_step,
            params_total=self.params_total,
            message=message,
            **result,
        )
        if dist.main:
            run.write_summary(out.to_dict())
            self.tracking.finish(ok=status != "diverged")
        dist.barrier()
        return out


def load_run(run_dir: str | Path, *, device: Any = None):
    """``(model, arch, tokenizer, info)`` from a run folder's latest checkpoint (UserError if none).

    ``info`` holds the config, the checkpoint's step and tokens, status and summary.
    """
    run = RunDir(run_dir)
    run.require_run()
    ckpt = usable_checkpoint(run.root)
    if ckpt is None:
        raise UserError(f"run folder {str(run.root)!r} holds no checkpoint yet")
    arch = run.read_architecture()
    tokenizer = load_tokenizer(run.tokenizer)
    model = build_model(arch, device=device or "cpu")
    state = load_checkpoint(ckpt, model, restore_rng=False)
    model.eval()
    info = {
        "step": state["step"],
        "tokens": state["tokens"],
        "config": read_run_file(run.root, RUN_JSON, keys=("config",), versioned=True)["config"],
        "status": run.read_status(),
        "summary": (
            read_run_file(run.root, run.summary_json.name) if run.summary_json.is_file() else None
        ),
    }
    return model, arch, tokenizer, info
