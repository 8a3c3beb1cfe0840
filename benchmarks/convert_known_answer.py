"""Known answer: do the placement strategies keep the attention layers that carry recall?

Question: train a small teacher on text mixed with MAD in-context recall, find the attention
layer(s) whose conversion alone collapses its recall accuracy, then ask each placement strategy
of ``hcomposer convert`` to keep that many layers: does it keep those?

Setup, per seed: a teacher ``(AF)*n`` (byte tokens, the embedded corpus) trained by
``hcomposer.training.train`` with the objective ``RecallMix``: every step's text batch plus a
weighted batch of MAD in-context recall sequences (their 16 tokens moved to ids 260..275,
outside the byte range). Per attention layer: the teacher with that one layer converted
(``--to``, mapped initialisation and the least-squares calibration on text, no training)
scored on held-out recall sequences. A layer carries recall when its conversion leaves at
most half of the teacher's accuracy above chance; k = how many do (if none, the one with the
largest drop, flagged ``fallback``). Then ``hcomposer.convert.convert`` with ``--keep k`` and
each strategy, whether the kept set holds the carrying layers, and the distilled student's
recall accuracy. The strategies: ``even``, ``greedy``, ``gates`` and ``optuna`` as ``convert``
runs them (scoring on the distillation text), and ``gates-recall``: ``gates`` with its gates
also trained on the recall data (``--gate-recall-weight``, tokens at 260..275).

    nice -n 10 python benchmarks/convert_known_answer.py --work /tmp/known_answer \\
        --out benchmarks/results/convert_known_answer/raw.jsonl

Resumable: every finished part (a teacher, its per-layer scan, one strategy) is one line of
the JSONL log and is read back instead of rerun; runs live in the work folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from hcomposer.architecture import Architecture
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.convert.recall import RECALL_CHANCE, RecallData, RecallMix, recall_accuracy
from hcomposer.convert.run import ConvertConfig, convert
from hcomposer.convert.teacher import load_teacher
from hcomposer.data import embedded_corpus_text
from hcomposer.io import append_jsonl, read_jsonl
from hcomposer.training import TrainConfig, load_run, train

SHAPE = dict(
    name="teacher", d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=320,
    max_seq_len=512, init_std=0.15, window=32,
)  # fmt: skip
OFFSET = 260  # MAD tokens 0..15 become 260..275: no byte of the text uses them
STRATEGIES = ("even", "greedy", "gates", "optuna", "gates-recall")


def carrying_layers(acc: dict[int, float], teacher: float, chance: float) -> tuple[list, bool]:
    """Attention ordinals whose conversion leaves at most half of the teacher's accuracy above
    chance; when none does, the one with the lowest accuracy (second value True)."""
    bar = chance + 0.5 * (teacher - chance)
    hit = sorted(j for j, a in acc.items() if a <= bar)
    if hit:
        return hit, False
    return [min(acc, key=acc.get)], True


def layer_scan(
    teacher_dir: Path, data: RecallData, text: torch.Tensor, to: str
) -> dict[int, float]:
    """Recall accuracy with each attention layer alone converted (mapped init, calibrated on
    ``text``, no training), by attention ordinal."""
    teacher = load_teacher(teacher_dir)
    out = {}
    for j, i in enumerate(teacher.attention_layers):
        arch = student_architecture(teacher.arch, [i], to)
        student, _ = convert_model(teacher.model, arch, calib_tokens=text, seed=0)
        out[j] = recall_accuracy(student, data)
    return out


def train_teacher(work: Path, data_file: Path, mad: RecallData, seed: int, args) -> Path:
    out = work / f"teacher-seed{seed}"
    config = TrainConfig(
        tokens=args.teacher_steps * args.text_batch * 128, batch_size=args.text_batch, seq_len=128,
        lr=3e-3, min_lr=3e-4, warmup=0.05, dtype="fp32", eval_every=0, eval_tokens=8192,
        log_every=50, checkpoint_every=100, data=str(data_file), threads=1, seed=seed,
    )  # fmt: skip
    arch = Architecture.parse("AF" * args.layers, shape=SHAPE)
    objective = RecallMix(mad, args.recall_batch, args.recall_weight)
    train(arch, config, out, resume=(out / "run.json").is_file(), progress=False,
          objective=objective)  # fmt: skip
    return out


def run_strategy(work: Path, teacher: Path, data_file: Path, k: int, name: str, seed, args):
    """``gates-recall``: the ``gates`` strategy with its gates also trained on the recall data
    (``--gate-recall-weight``, the recall tokens where the teacher learned them)."""
    recall = dict(gate_recall_weight=args.gate_recall_weight, gate_recall_offset=OFFSET)
    config = ConvertConfig(
        **(recall if name == "gates-recall" else {}),
        teacher=str(teacher), to=args.to, keep=k, strategy=name.split("-")[0], tokens=args.tokens,
        probe_tokens=args.probe_tokens, trials=args.trials, seq_len=128, batch_size=args.batch,
        lr=1e-3, data=str(data_file), eval_tokens=8192, lm_weight=0.1, seed=seed,
    )  # fmt: skip
    out = work / f"convert-seed{seed}-{name}"
    summary = convert(config, out, resume=(out / "convert.json").is_file())
    return summary, out


def seed_parts(work, data_file, seed, done: dict, log: Path, args) -> None:
    """Every part of one seed not yet in ``done`` (appended to ``log`` as it finishes)."""
    mad = RecallData(seed, OFFSET, SHAPE["vocab_size"])
    chance = RECALL_CHANCE
    teacher = train_teacher(work, data_file, mad, seed, args)
    if (seed, "teacher") not in done:
        model, _, _, _ = load_run(teacher)
        rec = {"seed": seed, "part": "teacher", "recall_acc": recall_accuracy(model, mad)}
        append_jsonl(log, rec)
        done[(seed, "teacher")] = rec
    if (seed, "scan") not in done:
        text = torch.tensor(np.frombuffer(data_file.read_bytes()[: 16 * 128], np.uint8))
        scan = layer_scan(teacher, mad, text.long().view(16, 128), args.to)
        carry, fallback = carrying_layers(scan, done[(seed, "teacher")]["recall_acc"], chance)
        rec = {"seed": seed, "part": "scan", "to": args.to, "chance": chance,
               "acc": {str(j): a for j, a in scan.items()}, "carrying": carry,
               "fallback": fallback}  # fmt: skip
        append_jsonl(log, rec)
        done[(seed, "scan")] = rec
    carry = done[(seed, "scan")]["carrying"]
    for name in STRATEGIES:
        if (seed, name) in done:
            continue
        summary, out = run_strategy(work, teacher, data_file, len(carry), name, seed, args)
        keep = summary["kept_attention_layers"]
        student, _, _, _ = load_run(out / "student")
        rec = {"seed": seed, "part": name, "keep": keep, "carrying": carry,
               "keeps_carrying": set(carry) <= set(keep),
               "student_recall_acc": recall_accuracy(student, mad),
               "student_val_loss": summary["student"]["val_loss"],
               "teacher_val_loss": summary["teacher_val_loss"]}  # fmt: skip
        append_jsonl(log, rec)
        done[(seed, name)] = rec
        print(seed, name, keep, carry, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="the JSONL log (read back on resume)")
    p.add_argument("--to", default="D")
    p.add_argument("--layers", type=int, default=4, help="attention layers of the teacher")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16, help="distillation batch")
    p.add_argument("--text-batch", type=int, default=8, help="teacher: text sequences a step")
    p.add_argument("--recall-batch", type=int, default=64, help="teacher: recall sequences")
    p.add_argument("--recall-weight", type=float, default=2.0, help="teacher: recall loss weight")
    p.add_argument("--tokens", type=int, default=16384, help="final distillation tokens")
    p.add_argument("--probe-tokens", type=int, default=8192)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--gate-recall-weight", type=float, default=1.0, help="gates-recall")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    torch.set_num_threads(1)
    work, log = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HCOMPOSER_CACHE", str(work / "cache"))
    data_file = work / "train.txt"
    if not data_file.is_file():
        data_file.write_text(embedded_corpus_text()[:1_000_000], encoding="utf-8")
    done = {(r["seed"], r["part"]): r for r in (read_jsonl(log) if log.is_file() else [])}
    for seed in (int(s) for s in args.seeds.split(",")):
        seed_parts(work, data_file, seed, done, log, args)


if __name__ == "__main__":
    main()
