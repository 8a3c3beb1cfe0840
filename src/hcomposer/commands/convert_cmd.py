"""hcomposer convert: a pretrained model -> chosen attention layers converted, then distilled."""

from __future__ import annotations

import json

from hcomposer.commands.options import add_data, add_fields, add_output
from hcomposer.convert.run import ConvertConfig, convert
from hcomposer.errors import UserError
from hcomposer.format import console, parse_count
from hcomposer.guards import check_output_dir

HELP = (
    "Start from a pretrained model: keep K attention layers, convert the rest to S, D or W "
    "(initialised from the attention weights) and distil from the teacher."
)


def add_arguments(p) -> None:
    p.add_argument("teacher", metavar="TEACHER", help="Hugging Face model folder or run folder")
    p.add_argument("--keep", type=int, default=None, help="attention layers to keep")
    p.add_argument(
        "--keep-layers", default="",
        help="which attention layers to keep, e.g. 0,3 (0-based; sets --keep)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="new folder for the conversion")
    add_fields(
        p, ConvertConfig, "to strategy trials gate_penalty gate_recall_weight gate_recall_offset"
    )
    add_fields(p, ConvertConfig, "seq_len batch_size lr", counts="probe_tokens tokens")
    add_data(p, default="the embedded corpus", what="distillation text")
    p.add_argument("--tokenizer", default=None, help="default: the teacher's tokenizer")
    add_fields(p, ConvertConfig, "temperature kl_weight lm_weight hidden_weight freeze_mlp init")
    add_fields(p, ConvertConfig, "eval_every dtype seed device", counts="eval_tokens")
    p.add_argument("--resume", action="store_true", help="continue the conversion in --out")
    add_output(p)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    names = "trials gate_penalty gate_recall_weight gate_recall_offset seq_len batch_size lr"
    names += " temperature kl_weight lm_weight hidden_weight seed eval_every"
    return {name: (ConvertConfig, name) for name in names.split()}


def run(args) -> int:
    check_output_dir(args.out, "--out")
    keep = args.keep
    if keep is None:
        if not args.keep_layers:
            raise UserError("give --keep K (how many attention layers stay) or --keep-layers")
        keep = len([p for p in args.keep_layers.split(",") if p.strip()])
    config = ConvertConfig(
        teacher=args.teacher, to=args.to, init=args.init, keep=keep, layers=args.keep_layers,
        strategy=args.strategy, trials=args.trials, gate_penalty=args.gate_penalty,
        gate_recall_weight=args.gate_recall_weight, gate_recall_offset=args.gate_recall_offset,
        probe_tokens=parse_count(args.probe_tokens, "--probe-tokens"),
        tokens=parse_count(args.tokens, "--tokens"), seq_len=args.seq_len,
        batch_size=args.batch_size, lr=args.lr, data=args.data, tokenizer=args.tokenizer,
        seed=args.seed, device=args.device,
        eval_tokens=parse_count(args.eval_tokens, "--eval-tokens"),
        eval_every=args.eval_every, dtype=args.dtype,
        temperature=args.temperature, kl_weight=args.kl_weight, lm_weight=args.lm_weight,
        hidden_weight=args.hidden_weight, freeze_mlp=args.freeze_mlp,
    )  # fmt: skip
    summary = convert(
        config, args.out, resume=args.resume, progress=not (args.no_progress or args.json),
        argv=args.argv,
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    s = summary["student"]
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    console().print(
        f"{summary['teacher_pattern']} -> {summary['student_pattern']} "
        f"(kept attention layers {summary['kept_attention_layers']}, "
        f"{summary['strategy']}); validation loss teacher {summary['teacher_val_loss']:.4f}, "
        f"student {val}; report in {args.out}/report.md"
    )
    return 0 if s["status"] != "diverged" else 1
