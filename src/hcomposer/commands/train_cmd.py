"""hcomposer train: train a pattern (or an architecture JSON) on text into a run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hcomposer.accounting import estimate_memory
from hcomposer.architecture import Architecture
from hcomposer.commands.options import add_data, add_output, add_tokenizer
from hcomposer.format import console, human, parse_count
from hcomposer.guards import check_memory, check_output_dir
from hcomposer.primitives import primitive_class
from hcomposer.runs import RunDir
from hcomposer.threads import auto_batch_threads, usable_cores
from hcomposer.tracking import add_report_to, parse_report_to
from hcomposer.training.step import resolve_device
from hcomposer.training.trainer import TrainConfig, train

HELP = "Train an architecture on text (the embedded corpus by default) into a run folder."


def add_arguments(p) -> None:
    p.add_argument(
        "arch",
        metavar="PATTERN|ARCH.json|DIR",
        help="pattern, architecture JSON file, or a folder holding architecture.json",
    )
    p.add_argument(
        "--shape",
        default=None,
        help="preset or JSON file (default: proxy, or the shape stored in ARCH.json)",
    )
    add_data(p, default="the embedded corpus")
    add_tokenizer(p, "byte", "byte")
    p.add_argument("--tokens", default="1M", help="training tokens, e.g. 2M (default 1M)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction (<1) or steps")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--batch-size", type=int, default=16, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--dtype", choices=["auto", "bf16", "fp32"], default="auto",
        help="auto: bf16 where the device has native bf16 (CUDA, AVX512-BF16/AMX), else fp32",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-tokens", default="64K")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--fsdp", action="store_true",
        help="shard weights, gradients and optimiser state over torchrun's processes (FSDP2)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads; 0 (default): all cores when the machine is idle, fewer while other "
        "processes keep cores busy (re-checked as training goes; OMP_NUM_THREADS fixes it too)",
    )  # fmt: skip
    p.add_argument(
        "--batch-threads", type=int, default=0,
        help="train N row slices of each micro-batch concurrently, one thread each, with one "
        "intra-op thread; 0 (default): one per core on a CPU with 2-4 cores, else 1 (no split)",
    )  # fmt: skip
    add_report_to(p)
    add_output(p)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    names = (
        "lr min_lr warmup schedule batch_size seq_len grad_accum weight_decay grad_clip dtype "
        "eval_every log_every checkpoint_every seed threads"
    )
    return {name: (TrainConfig, name) for name in names.split()}


def _architecture(spec: str, shape: str | None):
    path = Path(spec)
    try:
        if path.is_dir() and RunDir(path).is_run():
            # A folder holding an architecture (a run, an export, a scale result).
            path = RunDir(path).architecture
        is_file = path.suffix == ".json" or path.is_file()
    except (OSError, ValueError):  # a name too long for a path, or a NUL: a pattern
        is_file = False
    if is_file:
        arch = Architecture.from_json(path)
        return arch.with_shape(shape) if shape else arch
    return Architecture.parse(spec, shape=shape or "proxy")


def _batch_threads(args, arch) -> int:
    """``--batch-threads``, with 0 resolved by :func:`hcomposer.threads.auto_batch_threads`."""
    if args.batch_threads:
        return args.batch_threads

    stateful = any(primitive_class(t).forward_updates_state for layer in arch.layers for t in layer)
    return auto_batch_threads(
        usable=usable_cores(),
        cpu=resolve_device(args.device).type == "cpu",
        threads=args.threads,
        rows=max(args.batch_size // max(args.grad_accum, 1), 1),
        excluded=bool(args.compile or args.fsdp or stateful),
    )


def run(args) -> int:
    check_output_dir(args.out, "--out")
    report_to = parse_report_to(args.report_to)
    arch = _architecture(args.arch, args.shape)
    config = TrainConfig.from_args(
        args,
        tokens=parse_count(args.tokens, "--tokens"),
        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
        eval_tokens=parse_count(args.eval_tokens, "--eval-tokens"),
        batch_threads=_batch_threads(args, arch),
    )
    micro = max(config.batch_size // config.grad_accum, 1)
    need = estimate_memory(arch, batch=micro, seq_len=config.seq_len, training=True)
    check_memory(need, f"training {micro} x {config.seq_len} tokens per micro-step")
    result = train(
        arch,
        config,
        args.out,
        resume=args.resume,
        progress=not args.no_progress and not args.json,
        argv=args.argv,
        report_to=report_to,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if result.status != "diverged" else 1
    out = result.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _summary(out)
    if result.status == "diverged":
        console().print(f"[red]{result.message}[/red] (recorded in {args.out}/status.json)")
        return 1
    return 0


def _summary(out: dict) -> None:
    from rich.table import Table

    table = Table(title=f"run {out['out_dir']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    fmt = {
        "status": str,
        "step": str,
        "tokens": lambda v: f"{v:,}",
        "params_total": lambda v: f"{v:,} ({human(v)})",
        "loss": lambda v: f"{v:.4f}",
        "val_loss": lambda v: f"{v:.4f}",
        "val_ppl": lambda v: f"{v:.2f}",
        "tokens_per_second": lambda v: f"{v:,.0f}",
        "wall_seconds": lambda v: f"{v:.1f}",
    }
    for key, f in fmt.items():
        value = out.get(key)
        table.add_row(key.replace("_", " "), "-" if value is None else f(value))
    console().print(table)
