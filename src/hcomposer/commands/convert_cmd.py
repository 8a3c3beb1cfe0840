"""hcomposer convert: a pretrained model -> chosen attention layers converted, then distilled."""

from __future__ import annotations

import json

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
    p.add_argument("--to", choices=["S", "D", "W"], default="S", help="what the rest become")
    p.add_argument("--out", required=True, help="new folder for the conversion")
    p.add_argument(
        "--strategy", choices=["even", "greedy", "optuna", "gates"], default="even",
        help="even: spread evenly; greedy: Distill-then-Replace; optuna: TPE over keep-sets; "
        "gates: learned gates between attention and its twin (FlashMorph-style)",
    )  # fmt: skip
    p.add_argument("--trials", type=int, default=8, help="optuna: keep-sets tried")
    p.add_argument("--gate-penalty", type=float, default=0.05, help="gates: weight of mean(g)")
    p.add_argument(
        "--gate-recall-weight", type=float, default=0.0,
        help="gates: also train the gates on MAD in-context recall, this weight x its LM loss "
        "(default 0: on the distillation text only)",
    )  # fmt: skip
    p.add_argument(
        "--gate-recall-offset", type=int, default=0,
        help="gates: the recall's 16 tokens become ids OFFSET..OFFSET+15 of the teacher's "
        "vocabulary (ids the teacher recalls with)",
    )  # fmt: skip
    p.add_argument("--probe-tokens", default="32K", help="tokens of each placement probe")
    p.add_argument("--tokens", default="1M", help="distillation tokens (default 1M)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default=None, help="text, token shards or hf:NAME (default: corpus)")
    p.add_argument("--tokenizer", default=None, help="default: the teacher's tokenizer")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=0.1)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="per-sublayer state MSE")
    p.add_argument("--freeze-mlp", action="store_true", help="keep the teacher's MLPs")
    p.add_argument(
        "--init", choices=["attention", "random"], default="attention",
        help="converted mixers start from the attention weights (default) or fresh (ablation)",
    )  # fmt: skip
    p.add_argument("--eval-tokens", default="16K")
    p.add_argument(
        "--eval-every", type=int, default=0,
        help="validate the student every N distillation steps (default 0: at the end)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["auto", "bf16", "fp32"], default="fp32",
        help="the distillation's autocast dtype (default fp32)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue the conversion in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON document")


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
