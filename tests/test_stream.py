"""Streamed ``hf:`` sources: same ids as a full read, disjoint parts, exact resume, the trainer."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from hcomposer.architecture import Architecture
from hcomposer.data import (
    StreamingDataset,
    TokenStream,
    get_tokenizer,
    rehearsal_assets,
    resolve_source,
)
from hcomposer.data.stream import in_validation, open_validation
from hcomposer.errors import UserError
from hcomposer.io import read_jsonl
from hcomposer.training import TrainConfig, load_run, train

torch.set_num_threads(1)
CORPUS, TOKENIZER = rehearsal_assets()


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    # Nothing here may reach the network: the fixtures are local.
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(str(TOKENIZER))


def _full_read_ids(tok, part: str, seed: int, val_fraction: float) -> np.ndarray:
    """The same part read without streaming: the whole split in memory, then filtered."""
    full = datasets.load_dataset(str(CORPUS), split="train")
    ids = []
    for text in full["text"]:
        if in_validation(text, seed, val_fraction) == (part == "val"):
            ids.extend(tok.encode(text) + [tok.eos_id])
    return np.array(ids)


def test_streaming_gives_the_ids_of_a_full_read(tok, tmp_path):
    src = resolve_source(f"hf:{CORPUS}")
    ds = StreamingDataset(src, tok, val_fraction=0.1, seed=3)
    assert ds.plan["rule"] == "hash"
    for part in ("train", "val"):
        expected = _full_read_ids(tok, part, 3, 0.1)
        stream = TokenStream(src, tok, ds.plan, part)
        got = stream.take(len(expected))
        assert np.array_equal(got, expected), part
        # The next id starts the second epoch: the first record of the part again.
        assert stream.take(1)[0] == expected[0] and stream.epoch == 1


def test_train_and_validation_never_share_a_document(tok, tmp_path):
    src = resolve_source(f"hf:{CORPUS}")
    plan = StreamingDataset(src, tok, val_fraction=0.2).plan
    seen = {}
    for part in ("train", "val"):
        stream = TokenStream(src, tok, plan, part)
        seen[part] = {index for index, _ in stream._documents(0)}
    n = datasets.load_dataset(str(CORPUS), split="train").num_rows
    assert seen["train"] and seen["val"]
    assert not seen["train"] & seen["val"]
    assert seen["train"] | seen["val"] == set(range(n))
    # A duplicated document goes to the side its text hashes to, both times.
    text = "the same passage twice"
    assert in_validation(text, 0, 0.5) == in_validation(text, 0, 0.5)


def test_a_validation_split_is_used_when_the_dataset_has_one(tok, tmp_path):
    folder = tmp_path / "two_splits"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 5)):
        rows = [json.dumps({"text": f"{split} document {i} " * 20}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    ds = StreamingDataset(f"hf:{folder}", tok)
    assert ds.plan == {"rule": "split", "train": "train", "val": "validation"}
    x, _ = next(ds.eval_batches(2, 16, 64))
    assert "validation document" in tok.decode(x[0].tolist())
    assert "train document" in tok.decode(ds.batch_at("train", 0, 2, 16)[0][0].tolist())


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_a_restored_position_continues_at_the_exact_next_batch(tok, cut):
    # 40 batches of 3 x 65 ids wrap past the end of the train part (one more epoch).
    whole = StreamingDataset(f"hf:{CORPUS}", tok, val_fraction=0.1)
    straight = [whole.batch_at("train", s, 3, 64) for s in range(cut + 4)]
    first = StreamingDataset(f"hf:{CORPUS}", tok, val_fraction=0.1)
    for s in range(cut):
        first.batch_at("train", s, 3, 64)
    state = json.loads(json.dumps(first.state_dict()))  # saved with the checkpoint as JSON
    assert state["next_batch"] == cut and state["offset"] > 0  # cut inside a document
    again = StreamingDataset(f"hf:{CORPUS}", tok, val_fraction=0.1)
    again.load_state_dict(state)
    for s in range(cut, cut + 4):
        x, y = again.batch_at("train", s, 3, 64)
        assert torch.equal(x, straight[s][0]) and torch.equal(y, straight[s][1]), s
    with pytest.raises(RuntimeError, match="asked for 2"):
        again.batch_at("train", 2, 3, 64)


def test_a_position_from_another_tokenizer_or_source_is_refused(tok, tmp_path):
    ds = StreamingDataset(f"hf:{CORPUS}", tok)
    ds.batch_at("train", 0, 2, 16)
    other = StreamingDataset(f"hf:{CORPUS}", get_tokenizer("byte"))
    with pytest.raises(UserError, match="another tokenizer"):
        other.load_state_dict(ds.state_dict())


def _config(**kw) -> TrainConfig:
    base = dict(
        tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, warmup=1, eval_every=3,
        eval_tokens=256, log_every=1, checkpoint_every=2, dtype="fp32", device="cpu",
        data=f"hf:{CORPUS}", tokenizer=str(TOKENIZER), val_fraction=0.1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_a_killed_streamed_run_resumes_where_it_stopped(tmp_path):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config()
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    assert straight.status == "completed" and straight.step == 6
    half = train(arch, cfg, tmp_path / "split", progress=False, stop_at=3)
    assert half.status == "running"
    resumed = train(arch, cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.status == "completed"

    def losses(run):
        return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}

    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert straight.val_loss == resumed.val_loss
    m1, arch1, tok1, _ = load_run(tmp_path / "straight")
    m2, *_ = load_run(tmp_path / "split")
    assert arch1.shape.vocab_size == 1024 and tok1.vocab_size == 1024
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), k
    # Evaluation reads the same held-out documents as training did.
    val = open_validation(cfg.data, tok1, cfg.val_fraction, cfg.seed)
    assert isinstance(val, StreamingDataset) and val.plan["rule"] == "hash"


def test_an_unknown_dataset_is_one_line_before_training(tmp_path):
    cfg = _config(data="hf:no-such-owner/no-such-dataset")
    with pytest.raises(UserError, match="could not be reached.*--data hf:PATH") as err:
        train(Architecture.parse("AF", shape="tiny"), cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
