"""Faults in flight: a trial whose loss turns NaN, a disk that fills during a checkpoint write,
eight workers on one SQLite study."""

from __future__ import annotations

import errno
import math
import stat

import pytest
import torch

import hcomposer.training.checkpoint as checkpoint_module
from hcomposer.architecture import Architecture
from hcomposer.data import embedded_corpus_text
from hcomposer.io import append_jsonl, current_umask, read_jsonl
from hcomposer.model import build_model
from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.objectives import synthetic_score
from hcomposer.training.checkpoint import find_checkpoint, read_state
from hcomposer.training.trainer import TrainConfig, load_run, train

POISONED = "AAA"


def nan_loss_objective(arch: Architecture, proxy: str, seed: int) -> dict:
    """A real (tiny) loss; for one pattern a weight is NaN, so the loss turns NaN."""
    model = build_model(arch.with_shape(arch.shape.replace(vocab_size=32)), seed=seed)
    if arch.pattern == POISONED:
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
    x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    return {"score": -float(loss) + synthetic_score(arch.pattern, seed)}


def test_a_trial_whose_loss_turns_nan_fails_with_its_reason_and_the_search_goes_on(tmp_path):
    config = SearchConfig(
        primitives="AF", layers=3, trials=7, sampler="random", shape="tiny",
        proxy="synthetic", seed=0,
    )  # fmt: skip
    # 7 trials of a space of 2**3 = 8 patterns: every pattern but the poisoned one must
    # complete, so the search has to go on past the failure (the sampler meets AAA on the way).
    result = run_search(config, tmp_path / "s", objective=nan_loss_objective, progress=False)
    trials = load_trials(tmp_path / "s")
    failed = [t for t in trials if t["state"] == "FAIL"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert failed and {t["pattern"] for t in failed} == {POISONED}
    assert all("nan" in t["failure"].lower() for t in failed)
    assert len(done) == 7 and POISONED not in {t["pattern"] for t in done}
    assert all(math.isfinite(t["score"]) for t in done)
    assert result.best["pattern"] != POISONED


def _config(text_file, **kw) -> TrainConfig:
    base = dict(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=1,
        dtype="fp32", eval_every=0, eval_tokens=256, log_every=1, checkpoint_every=1,
        data=str(text_file),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "austen.txt"
    path.write_text(embedded_corpus_text()[:40_000], encoding="utf-8")
    return path


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_works(
    tmp_path, text_file, monkeypatch
):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file)
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=2)
    before = read_state(find_checkpoint(out))
    assert before["step"] == 2
    # Run folders follow the user's umask (mkdtemp/mkstemp alone would make them private).
    mask = current_umask()
    assert stat.S_IMODE((out / "checkpoint").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "run.json").stat().st_mode) == 0o666 & ~mask

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *a, **kw):
        # The optimiser file: half of it reaches the disk, then the disk is full.
        calls["n"] += 1
        real_save(tensors, filename, *a, **kw)
        with open(filename, "r+b") as f:
            f.truncate(max(1, f.seek(0, 2) // 2))
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OSError) as err:
        train(arch, cfg, out, resume=True, progress=False, stop_at=3)
    assert err.value.errno == errno.ENOSPC and calls["n"] == 1
    monkeypatch.undo()

    # The previous checkpoint is whole (checksums pass), and no partial folder is left.
    assert read_state(find_checkpoint(out))["step"] == 2
    assert not list(out.glob(".checkpoint.tmp-*"))
    resumed = train(arch, cfg, out, resume=True, progress=False)
    assert resumed.status == "completed" and resumed.step == straight.step
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    assert losses == {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight/metrics.jsonl")}
    m1, *_ = load_run(tmp_path / "straight")
    m2, *_ = load_run(out)
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), k


def test_eight_workers_on_one_sqlite_study(tmp_path):
    config = SearchConfig(
        primitives="AFW", layers=4, trials=24, sampler="random", shape="tiny",
        proxy="synthetic", workers=8, seed=3,
    )  # fmt: skip
    run_search(config, tmp_path / "par", progress=False)
    trials = load_trials(tmp_path / "par")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 24
    assert len({t["pattern"] for t in done}) == 24  # none trained twice
    assert len({t["number"] for t in trials}) == len(trials)
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]


def test_an_append_after_a_torn_line_is_not_lost(tmp_path):
    """A kill mid-write leaves a fragment with no newline; the next record must start its own
    line (glued to the fragment, it would be skipped as damaged with it)."""
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"n": 1})
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"n": 2, "tor')
    append_jsonl(log, {"n": 3})
    append_jsonl(log, {"n": 4})
    assert [r["n"] for r in read_jsonl(log)] == [1, 3, 4]
    assert log.read_text().count("\n") == 4
    empty = tmp_path / "new.jsonl"
    append_jsonl(empty, {"n": 0})
    assert empty.read_text() == '{"n": 0}\n'
