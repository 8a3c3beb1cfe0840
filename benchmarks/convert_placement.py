"""Which attention layers to keep: the placement strategies against every keep-set, on CPU.

Question: on one small teacher, do ``even``, ``greedy``, ``optuna`` and ``gates`` pick keep-sets
that distil better than the others, and does the attention initialisation still matter after
the distillation budget?

Setup: a teacher ``(AF)*6`` (d_model 64, 4 query / 2 key-value heads, byte tokens) trained by
``hcomposer train`` on the first 1M characters of the embedded corpus; every one of the 15
keep-sets of 2 attention layers converted (the other 4 to ``--to``) and distilled with the same
budget on 2 seeds (the ground truth); each strategy's pick, with the tokens its probes spent;
and the ``even`` keep-set distilled from a random start (``--init random``). Everything is
``hcomposer.convert.convert``, the code behind ``hcomposer convert``.

    python benchmarks/convert_placement.py --work /tmp/convert_study \\
        --out benchmarks/results/convert_placement/raw.json

The work folder keeps every run (resumable: finished runs are read back); the raw file holds
the numbers the README in the results folder quotes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from hcomposer.architecture import Architecture
from hcomposer.convert.run import ConvertConfig, convert
from hcomposer.data import embedded_corpus_text
from hcomposer.io import atomic_write_json
from hcomposer.training import TrainConfig, train

SHAPE = dict(
    name="teacher", d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=320,
    max_seq_len=512, init_std=0.05, window=32,
)  # fmt: skip
STRATEGIES = ("even", "greedy", "optuna", "gates")


def teacher_run(work: Path, data: Path, steps: int) -> Path:
    out = work / "teacher"
    config = TrainConfig(
        tokens=steps * 16 * 128, batch_size=16, seq_len=128, lr=3e-3, min_lr=3e-4, warmup=0.05,
        dtype="fp32", eval_every=0, eval_tokens=32768, log_every=50, checkpoint_every=200,
        data=str(data), threads=1,
    )  # fmt: skip
    arch = Architecture.parse("AF" * 6, shape=SHAPE)
    train(arch, config, out, resume=(out / "run.json").is_file(), progress=False)
    return out


def one(work: Path, name: str, **fields) -> dict:
    config = ConvertConfig(**fields)
    out = work / name
    summary = convert(config, out, resume=(out / "convert.json").is_file())
    placement = json.loads((out / "placement.json").read_text())
    # Tokens the placement's probes trained on (each probe is probe_tokens long).
    probes = {"greedy": 6, "gates": 6, "optuna": len(placement.get("trials", []))}
    return {
        "keep": summary["kept_attention_layers"],
        "val_loss": summary["student"]["val_loss"],
        "teacher_val_loss": summary["teacher_val_loss"],
        "scores": placement.get("scores", {}),
        "probe_tokens": probes.get(placement["strategy"], 0) * config.probe_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--to", default="S")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--tokens", type=int, default=49152)
    p.add_argument("--probe-tokens", type=int, default=16384)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HCOMPOSER_CACHE", str(work / "cache"))
    data = work / "train.txt"
    if not data.is_file():
        data.write_text(embedded_corpus_text()[:1_000_000], encoding="utf-8")
    teacher = teacher_run(work, data, args.teacher_steps)
    base = dict(
        teacher=str(teacher), to=args.to, keep=2, tokens=args.tokens, seq_len=128,
        batch_size=16, lr=1e-3, data=str(data), eval_tokens=32768, lm_weight=0.1,
        probe_tokens=args.probe_tokens, trials=6,
    )  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    raw = {"setup": {**base, "teacher": "(AF)*6", "shape": SHAPE, "seeds": seeds}}
    raw["exhaustive"] = {}
    for keep in itertools.combinations(range(6), 2):
        key = ",".join(map(str, keep))
        raw["exhaustive"][key] = [
            one(work, f"keep-{key}-seed{s}", **base, layers=key, seed=s)["val_loss"] for s in seeds
        ]
        print(key, raw["exhaustive"][key], flush=True)
    raw["strategies"] = {}
    for strategy in STRATEGIES:
        got = one(work, f"strategy-{strategy}", **base, strategy=strategy, seed=0)
        raw["strategies"][strategy] = got
        print(strategy, got["keep"], got["val_loss"], flush=True)
    even = raw["strategies"]["even"]["keep"]
    raw["random_init"] = [
        one(work, f"random-even-seed{s}", **base, layers=",".join(map(str, even)), seed=s,
            init="random")["val_loss"]
        for s in seeds
    ]  # fmt: skip
    raw["teacher_val_loss"] = raw["strategies"]["even"]["teacher_val_loss"]
    atomic_write_json(Path(args.out), raw)


if __name__ == "__main__":
    main()
