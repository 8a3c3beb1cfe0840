"""A converted hybrid against the same hybrid trained from scratch, on CPU.

Question: a teacher ``(AF)*6`` is converted to a hybrid that keeps 2 of its 6 attention layers
(the other 4 become Mamba-2, ``S``, initialised from the attention weights) and distilled for
a budget of B tokens. How many times fewer tokens (and FLOPs) does it need to reach the loss
the same hybrid reaches when trained from scratch for 16 x B tokens, and how far is it from the
teacher's loss? And the other way round: how many tokens does the from-scratch run need to
reach the converted model's final loss?

Curves are validation losses during one run each (one cosine schedule per run), so a point
before a run's end is not annealed and is higher than a run of that length would end at:
this favours the from-scratch arm in the first question and the converted one in the second.

Setup: the teacher is trained by ``hcomposer.training.train`` (the trainer behind ``hcomposer
train``) on the first 1M characters of the embedded corpus; the conversions are
``hcomposer.convert.convert`` (the code behind ``hcomposer convert``) with a fixed keep-set;
the from-scratch runs are ``train`` again, with the teacher's recipe. Every run reads one
prepared token folder, so every run validates on the same held-out windows and the teacher
never saw them (the split is made once, with seed 0; the seeds change the weights and the
batch order only). bf16 autocast throughout, one CPU thread.

FLOPs per training token (``hcomposer.accounting.count_costs``, forward F): 3 F for a run
trained on its own loss (forward and backward), 3 F_student + F_teacher for the distillation
(the teacher's forward pass on every token). Validation passes are not counted (both arms
validate). The teacher's own pretraining is counted only in ``result.json``'s
``with_teacher_pretraining`` figure.

    python benchmarks/convert_vs_scratch.py --work /tmp/convert_vs_scratch \\
        --out benchmarks/results/convert_vs_scratch

Resumable: each run has its own folder under ``--work`` (a killed run resumes from its last
checkpoint); a run whose record is in ``OUT/raw.jsonl`` is skipped. ``--analyse`` only
recomputes ``OUT/result.json`` from ``OUT/raw.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from scipy import stats as sstats

from hcomposer.accounting import count_costs
from hcomposer.architecture import Architecture
from hcomposer.convert.mapping import student_architecture
from hcomposer.convert.run import ConvertConfig, convert
from hcomposer.convert.teacher import load_teacher
from hcomposer.data import embedded_corpus_text, get_tokenizer, prepare_dataset
from hcomposer.io import append_jsonl, atomic_write_json, read_jsonl
from hcomposer.training import TrainConfig, train

SHAPE = dict(
    name="teacher", d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=320,
    max_seq_len=512, init_std=0.05, window=32,
)  # fmt: skip
BATCH, SEQ, EVAL_TOKENS = 16, 128, 16384
STEP = BATCH * SEQ


def _curve(run_dir: Path) -> list[list[float]]:
    """[tokens, val_loss] at every validation of a run, in order (the last write of a step)."""
    by_step = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r.get("val_loss") is not None:
            by_step[r["step"]] = [r["tokens"], r["val_loss"]]
    return [by_step[s] for s in sorted(by_step)]


def _train_config(tokens: int, data: Path, seed: int, lr: float, eval_every: int) -> TrainConfig:
    return TrainConfig(
        tokens=tokens, batch_size=BATCH, seq_len=SEQ, lr=lr, min_lr=lr / 10, warmup=0.05,
        dtype="bf16", eval_every=eval_every, eval_tokens=EVAL_TOKENS, log_every=50,
        checkpoint_every=200, seed=seed, data=str(data), threads=1,
    )  # fmt: skip


def _fwd_flops(arch: Architecture) -> float:
    return count_costs(arch, seq_len=SEQ).flops_per_token


def run_teacher(work: Path, data: Path, tokens: int) -> dict:
    out = work / "teacher"
    arch = Architecture.parse("AF" * 6, shape=SHAPE)
    t0 = time.time()
    r = train(arch, _train_config(tokens, data, 0, 3e-3, 100), out,
              resume=(out / "run.json").is_file(), progress=False)  # fmt: skip
    f = _fwd_flops(arch)
    return {"arm": "teacher", "seed": 0, "pattern": arch.pattern, "tokens": r.tokens,
            "fwd_flops_per_token": f, "train_flops_per_token": 3 * f,
            "curve": _curve(out), "final_val_loss": r.val_loss,
            "wall_s": time.time() - t0}  # fmt: skip


def run_converted(work: Path, data: Path, args, seed: int, mult: int = 1) -> dict:
    """A conversion distilled for ``mult`` x B tokens (1: the ``converted`` arm, else
    ``converted_long``)."""
    out = work / (f"converted-seed{seed}" if mult == 1 else f"converted-x{mult}-seed{seed}")
    config = ConvertConfig(
        teacher=str(work / "teacher"), to=args.to, keep=2, layers=args.keep_layers,
        tokens=args.budget * mult, seq_len=SEQ, batch_size=BATCH, lr=args.distill_lr,
        data=str(data), eval_tokens=EVAL_TOKENS, eval_every=args.distill_eval_every * mult,
        dtype="bf16", seed=seed,
        lm_weight=0.1,
    )  # fmt: skip
    t0 = time.time()
    s = convert(config, out, resume=(out / "convert.json").is_file())
    teacher = load_teacher(str(work / "teacher"))
    student = teacher.arch.with_pattern(s["student_pattern"])
    fs, ft = _fwd_flops(student), _fwd_flops(teacher.arch)
    arm = "converted" if mult == 1 else "converted_long"
    return {"arm": arm, "seed": seed, "pattern": s["student_pattern"],
            "keep": s["kept_attention_layers"], "tokens": s["student"]["tokens"],
            "fwd_flops_per_token": fs, "teacher_fwd_flops_per_token": ft,
            "train_flops_per_token": 3 * fs + ft, "curve": _curve(out / "student"),
            "final_val_loss": s["student"]["val_loss"],
            "teacher_val_loss_fp32": s["teacher_val_loss"], "wall_s": time.time() - t0}  # fmt: skip


def run_scratch(work: Path, data: Path, args, seed: int) -> dict:
    teacher = load_teacher(str(work / "teacher"))
    keep = [int(k) for k in args.keep_layers.split(",")]
    attention = teacher.attention_layers
    arch = student_architecture(
        teacher.arch, [a for j, a in enumerate(attention) if j not in keep], args.to
    )
    out = work / f"scratch-seed{seed}"
    t0 = time.time()
    tokens = args.budget * args.scratch_mult
    r = train(arch, _train_config(tokens, data, seed, 3e-3, args.scratch_eval_every), out,
              resume=(out / "run.json").is_file(), progress=False)  # fmt: skip
    f = _fwd_flops(arch)
    return {"arm": "scratch", "seed": seed, "pattern": arch.pattern, "tokens": r.tokens,
            "fwd_flops_per_token": f, "train_flops_per_token": 3 * f, "curve": _curve(out),
            "final_val_loss": r.val_loss, "wall_s": time.time() - t0}  # fmt: skip


# ---- analysis: the headline figures from raw.jsonl (tests/test_convert_vs_scratch.py) ----


def crossing(curve: list[list[float]], target: float) -> tuple[float | None, bool]:
    """Tokens at which ``curve`` ([tokens, loss] points) first reaches ``target``: linear
    interpolation between the two points around the crossing. ``(tokens, True)`` when the first
    point is already at or below it (an upper bound); ``(None, False)`` when never reached."""
    for i, (tok, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(tok), True
            t0, l0 = curve[i - 1]
            return t0 + (tok - t0) * (l0 - target) / (l0 - loss), False
    return None, False


def _spread(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = float(sstats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n,
            "ci95": [mean - half, mean + half]}  # fmt: skip


def _pair(c: dict, s: dict, teacher: dict) -> dict:
    """One converted run against one from-scratch run, both ways round."""
    tok, bound = crossing(c["curve"], s["final_val_loss"])
    pair = {"converted_seed": c["seed"], "scratch_seed": s["seed"],
            "target": s["final_val_loss"], "tokens_needed": tok, "upper_bound": bound}  # fmt: skip
    scratch_flops = s["tokens"] * s["train_flops_per_token"]
    if tok is not None:
        pair["token_ratio"] = s["tokens"] / tok
        pair["flop_ratio"] = scratch_flops / (tok * c["train_flops_per_token"])
        # The teacher's pretraining charged to this one conversion.
        pre = teacher["tokens"] * teacher["train_flops_per_token"]
        pair["flop_ratio_with_teacher_pretraining"] = scratch_flops / (
            tok * c["train_flops_per_token"] + pre
        )
    # The other way round: the from-scratch tokens to the converted model's final loss.
    back, _ = crossing(s["curve"], c["final_val_loss"])
    pair["scratch_tokens_to_converted_final"] = back
    if back is not None:
        pair["reverse_token_ratio"] = back / c["tokens"]
        pair["reverse_flop_ratio"] = (back * s["train_flops_per_token"]) / (
            c["tokens"] * c["train_flops_per_token"]
        )
    return pair


def _compare(teacher: dict, conv: list[dict], scratch: list[dict]) -> dict:
    t_loss = teacher["final_val_loss"]
    out = {"converted_seeds": [r["seed"] for r in conv],
           "converted_tokens": conv[0]["tokens"] if conv else None}  # fmt: skip
    out["converted_final"] = _spread([r["final_val_loss"] for r in conv])
    out["gap_to_teacher_pct"] = _spread(
        [100 * (r["final_val_loss"] - t_loss) / t_loss for r in conv]
    )
    pairs = [_pair(c, s, teacher) for c in conv for s in scratch]
    out["pairs"] = pairs
    reached = [p for p in pairs if p["tokens_needed"] is not None]
    out["pairs_reached"] = f"{len(reached)}/{len(pairs)}"
    out["any_upper_bound"] = any(p["upper_bound"] for p in pairs)
    for key in ("token_ratio", "flop_ratio", "flop_ratio_with_teacher_pretraining"):
        out[key] = _spread([p[key] for p in reached]) if reached else None
    back = [p for p in pairs if p["scratch_tokens_to_converted_final"] is not None]
    out["reverse_pairs_reached"] = f"{len(back)}/{len(pairs)}"
    for key in ("reverse_token_ratio", "reverse_flop_ratio"):
        out[key] = _spread([p[key] for p in back]) if back else None
    out["goal_met"] = bool(
        reached
        and len(reached) == len(pairs)
        and min(p["token_ratio"] for p in reached) >= 10
        and out["gap_to_teacher_pct"]["max"] <= 5
    )
    return out


def analyse(records: list[dict]) -> dict:
    """The headline of the module docstring, with spreads over seeds; ``long``: the same for
    the longer distillations, where there are any."""
    records = list(records)
    teacher = next(r for r in records if r["arm"] == "teacher")

    def arm(name):
        return sorted((r for r in records if r["arm"] == name), key=lambda r: r["seed"])

    scratch = arm("scratch")
    t_loss = teacher["final_val_loss"]
    out = {"teacher_val_loss": t_loss, "teacher_tokens": teacher["tokens"],
           "scratch_seeds": [r["seed"] for r in scratch],
           "scratch_tokens": scratch[0]["tokens"] if scratch else None}  # fmt: skip
    out["scratch_final"] = _spread([r["final_val_loss"] for r in scratch]) if scratch else None
    out["scratch_gap_to_teacher_pct"] = (
        _spread([100 * (r["final_val_loss"] - t_loss) / t_loss for r in scratch])
        if scratch
        else None
    )
    out.update(_compare(teacher, arm("converted"), scratch))
    if arm("converted_long"):
        out["long"] = _compare(teacher, arm("converted_long"), scratch)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="results folder (raw.jsonl, result.json)")
    p.add_argument("--teacher-tokens", type=int, default=2000 * STEP)
    p.add_argument("--budget", type=int, default=96 * STEP, help="distillation tokens B")
    p.add_argument("--scratch-mult", type=int, default=16, help="from scratch: this x B")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-eval-every", type=int, default=4)
    p.add_argument("--scratch-eval-every", type=int, default=64)
    p.add_argument("--keep-layers", default="0,1")
    p.add_argument("--to", default="S")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--long-mult", type=int, default=4, help="longer distillation: this x B")
    p.add_argument("--long-seeds", default="", help="seeds of the longer distillation")
    p.add_argument("--analyse", action="store_true", help="only recompute result.json")
    args = p.parse_args()
    out = Path(args.out)
    raw = out / "raw.jsonl"
    if not args.analyse:
        torch.set_num_threads(1)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("HCOMPOSER_CACHE", str(work / "cache"))
        text = work / "train.txt"
        if not text.is_file():
            text.write_text(embedded_corpus_text()[:1_000_000], encoding="utf-8")
        # One prepared folder: the same split (seed 0) for every run, whatever its seed.
        data = Path(prepare_dataset(str(text), get_tokenizer("byte"), None, 0.02, 0).path)
        done = {(r["arm"], r["seed"]) for r in read_jsonl(raw)} if raw.is_file() else set()
        seeds = [int(s) for s in args.seeds.split(",")]
        # Two seeds of each arm first, so a kill leaves a comparison.
        plan = [("teacher", 0)] + [("converted", s) for s in seeds]
        plan += [("scratch", s) for s in seeds[:2]]
        plan += [("converted_long", int(s)) for s in args.long_seeds.split(",") if s.strip()]
        plan += [("scratch", s) for s in seeds[2:]]
        for arm, seed in plan:
            if (arm, seed) in done:
                continue
            if arm == "teacher":
                rec = run_teacher(work, data, args.teacher_tokens)
            elif arm == "converted":
                rec = run_converted(work, data, args, seed)
            elif arm == "converted_long":
                rec = run_converted(work, data, args, seed, args.long_mult)
            else:
                rec = run_scratch(work, data, args, seed)
            rec["setup"] = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
            out.mkdir(parents=True, exist_ok=True)
            append_jsonl(raw, rec)
            print(arm, seed, rec["final_val_loss"], f"{rec['wall_s']:.0f}s", flush=True)
    result = analyse(read_jsonl(raw))
    atomic_write_json(out / "result.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=1))


if __name__ == "__main__":
    main()
