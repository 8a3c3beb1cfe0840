"""hcomposer export: a run folder as a Hugging Face model folder."""

from __future__ import annotations

import json
import sys

import torch

from hcomposer.commands.options import add_output
from hcomposer.export import KINDS, export_run
from hcomposer.guards import check_output_dir

HELP = "Export a run folder as a Hugging Face model folder (native Llama or Bamba where it fits)."


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="DIR", help="run folder written by `hcomposer train`")
    p.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    p.add_argument(
        "--kind", choices=list(KINDS), default="auto",
        help="auto: LlamaForCausalLM for (AF)*n (Qwen2ForCausalLM with q/k/v biases, "
        "Qwen3ForCausalLM with q/k norms), BambaForCausalLM for (XF)*n with X in A,S, "
        "HComposerForCausalLM (self-contained remote code) otherwise",
    )  # fmt: skip
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    add_output(p, None)


def run(args) -> int:
    check_output_dir(args.out, "--out")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    summary = export_run(args.run_dir, args.out, dtype=dtype, kind=args.kind, argv=args.argv)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"exported {summary['pattern']} as {summary['model_class']} "
            f"({summary['params']:,} parameters, {summary['dtype']}) to {summary['path']}",
            file=sys.stderr,
        )
    return 0
