"""The known-answer placement study: its core logic on tiny inputs (seconds), and the figures
of benchmarks/results/convert_known_answer/README.md recomputed from raw.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcomposer.convert.recall import RecallData, RecallMix, recall_accuracy
from hcomposer.io import read_jsonl
from hcomposer.model import build_model, lm_loss
from load_script import script
from tagged_figures import assert_tagged_figures

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "results" / "convert_known_answer"
RAW = FOLDER / "raw.jsonl"
NAMES = ("even", "greedy", "gates", "optuna", "gates-recall")


def _script():
    return script("benchmarks/convert_known_answer.py")


def test_carrying_layers_known_answers():
    ka = _script()
    # Teacher 0.9, chance 0.1: the bar is 0.5; layers at or below it carry recall.
    assert ka.carrying_layers({0: 0.88, 1: 0.2, 2: 0.5, 3: 0.9}, 0.9, 0.1) == ([1, 2], False)
    # None collapses: the largest drop, flagged.
    assert ka.carrying_layers({0: 0.8, 1: 0.7, 2: 0.85}, 0.9, 0.1) == ([1], True)


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the right recall answer where one is scored."""

    def __init__(self, x, y, vocab, offset):
        super().__init__()
        self.x, self.y, self.vocab, self.offset = x, y, vocab, offset

    def forward(self, x):
        assert torch.equal(x, self.x)
        logits = torch.zeros(*x.shape, self.vocab)
        right = torch.where(self.y >= 0, self.y + self.offset, 0)
        return logits.scatter(-1, right[..., None], 10.0)


def test_recall_accuracy_and_the_mixed_objective():
    ka = _script()
    data = RecallData(0, ka.OFFSET, 320, n_test=8)
    x, y = data.test_x, torch.as_tensor(data.data.test_targets)
    assert torch.equal(x, torch.as_tensor(data.data.test_inputs) + ka.OFFSET)
    assert recall_accuracy(_Oracle(x, y, 320, ka.OFFSET), data) == 1.0
    assert recall_accuracy(_Oracle(x, torch.where(y >= 0, (y + 1) % 16, y), 320, ka.OFFSET),
                           data) == 0.0  # fmt: skip
    # The objective is the text LM loss plus the LM loss on recall sequences at the offset.
    model = build_model("AF", shape=dict(ka.SHAPE, max_seq_len=64), seed=0)
    mix = RecallMix(data, batch=4)
    text = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    got = mix.loss(model, text[:, :-1], text[:, 1:])
    idx = torch.randint(0, len(data.x), (4,), generator=torch.Generator().manual_seed(0))
    my = torch.as_tensor(data.data.train_targets)[idx]
    assert int(data.y[idx].min()) == -100 and int(data.y[idx].max()) >= ka.OFFSET
    want = lm_loss(model(text[:, :-1]), text[:, 1:]) + lm_loss(
        model(data.x[idx]), torch.where(my >= 0, my + ka.OFFSET, my)
    )
    torch.testing.assert_close(got, want)


def _records() -> dict[tuple[int, str], dict]:
    return {(r["seed"], r["part"]): r for r in read_jsonl(RAW)}


def figures() -> dict[str, str]:
    """Every number the README states, by name, formatted as it is printed there."""
    recs = _records()
    seeds = sorted({s for s, _ in recs})
    out = {"seeds": str(len(seeds))}
    for s in seeds:
        scan = recs[(s, "scan")]
        out[f"teacher{s}"] = f"{recs[(s, 'teacher')]['recall_acc']:.2f}"
        out[f"carry{s}"] = ",".join(map(str, scan["carrying"]))
        out[f"scan{s}"] = "/".join(f"{scan['acc'][k]:.2f}" for k in sorted(scan["acc"], key=int))
        for name in NAMES:
            if (s, name) in recs:
                r = recs[(s, name)]
                out[f"{name}{s}"] = ",".join(map(str, r["keep"]))
                out[f"{name}{s}_acc"] = f"{r['student_recall_acc']:.2f}"
    # Teachers whose scan found carrying layers (not the fallback): those that learned recall.
    learned = [s for s in seeds if not recs[(s, "scan")]["fallback"]]
    out["learned"] = str(len(learned))
    for name in NAMES:
        hits = [recs[(s, name)]["keeps_carrying"] for s in seeds if (s, name) in recs]
        out[f"{name}_hits"] = f"{sum(hits)}/{len(hits)}"
        hits = [recs[(s, name)]["keeps_carrying"] for s in learned if (s, name) in recs]
        out[f"{name}_hits_learned"] = f"{sum(hits)}/{len(hits)}"
    # Recall of the teachers that learned it, and of their students from the trained strategies.
    teachers = [recs[(s, "teacher")]["recall_acc"] for s in learned]
    students = [recs[(s, n)]["student_recall_acc"] for s in learned
                for n in NAMES[1:] if (s, n) in recs]  # fmt: skip
    out["learned_lo"], out["learned_hi"] = f"{min(teachers):.2f}", f"{max(teachers):.2f}"
    out["students_lo"], out["students_hi"] = f"{min(students):.2f}", f"{max(students):.2f}"
    for s in learned:
        r = recs[(s, "gates-recall")]
        out[f"gr_has1_{s}"] = "keeps" if 1 in r["keep"] else "drops"
        out[f"gr_has0_{s}"] = "keeps" if 0 in r["keep"] else "drops"
    return out


@pytest.mark.skipif(not RAW.is_file(), reason="the study's raw file is not there")
def test_readme_states_the_raw_files_figures():
    assert_tagged_figures(FOLDER / "README.md", figures())
