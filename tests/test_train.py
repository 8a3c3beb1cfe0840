"""Trainer: config round trip, schedules, exact resume, accumulation, divergence, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hcomposer.architecture import Architecture
from hcomposer.cli import main
from hcomposer.data import ByteTokenizer, embedded_corpus_text, prepare_dataset
from hcomposer.errors import UserError
from hcomposer.io import read_json, read_jsonl
from hcomposer.training import TrainConfig, load_run, train
from hcomposer.training import trainer as trainer_module
from hcomposer.training.schedule import lr_at
from hcomposer.training.step import evaluate, train_step

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "austen.txt"
    path.write_text(embedded_corpus_text()[:40_000], encoding="utf-8")
    return path


def _config(text_file, **kw) -> TrainConfig:
    base = dict(
        tokens=8 * 4 * 32,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        min_lr=3e-4,
        warmup=2,
        dtype="fp32",
        eval_every=4,
        eval_tokens=256,
        log_every=1,
        checkpoint_every=0,
        data=str(text_file),
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def _snapshot(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_config_json_round_trip_and_validation():
    cfg = TrainConfig(tokens=1000, batch_size=2, seq_len=8, betas=(0.8, 0.9), schedule="wsd")
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg and again.betas == (0.8, 0.9)
    assert cfg.total_steps == math.ceil(1000 / 16)
    for bad in (dict(schedule="linear"), dict(dtype="fp16"), dict(lr=-1.0), dict(tokens=4)):
        with pytest.raises(UserError):
            TrainConfig(**{"tokens": 1000, "batch_size": 2, "seq_len": 8, **bad})
    with pytest.raises(UserError, match="unknown train config field"):
        TrainConfig.from_dict({"tokens": 1000, "learning_rate": 1.0})


def test_schedules_known_values():
    kw = dict(total_steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), **kw) == pytest.approx(0.55, abs=0.02)
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, **wsd) == 1.0 and lr_at(79, **wsd) == 1.0
    assert lr_at(80, **wsd) < 1.0 and lr_at(99, **wsd) == pytest.approx(0.1)
    # A fractional warmup is a share of the steps.
    assert lr_at(4, **dict(kw, warmup=0.05)) == pytest.approx(1.0)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, text_file):
    arch = Architecture.parse("AE", shape="tiny")  # E: router bias buffers must resume too
    cfg = _config(text_file)
    straight = train(arch, cfg, tmp_path / "straight", progress=False)
    assert straight.status == "completed" and straight.step == 8
    half = train(arch, cfg, tmp_path / "split", progress=False, stop_at=4)
    assert half.status == "running"
    assert read_json(tmp_path / "split" / "status.json")["status"] == "running"
    # Steps after a checkpoint are run again on resume: fake a kill after step 5.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    resumed = train(arch, cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.status == "completed"
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert list(a) == list(range(1, 9)) and a == b
    assert straight.val_loss == resumed.val_loss
    m1, *_ = load_run(tmp_path / "straight")
    m2, *_ = load_run(tmp_path / "split")
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), k


def test_accumulation_matches_one_big_batch(tmp_path, text_file):
    arch = Architecture.parse("AF", shape="tiny")
    one = train(arch, _config(text_file, tokens=3 * 128), tmp_path / "one", progress=False)
    acc = _config(text_file, tokens=3 * 128, grad_accum=2)
    two = train(arch, acc, tmp_path / "two", progress=False)
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], abs=1e-5)
    assert one.val_loss == pytest.approx(two.val_loss, abs=1e-5)


def test_bf16_default_trains_and_load_run_reproduces_val_loss(tmp_path, text_file):
    cfg = _config(text_file, dtype="bf16", tokens=4 * 128)
    res = train(Architecture.parse("AF", shape="tiny"), cfg, tmp_path / "run", progress=False)
    assert res.status == "completed" and math.isfinite(res.loss)
    model, arch, tok, info = load_run(tmp_path / "run")
    assert arch.shape.vocab_size == 320  # 257 byte ids rounded up to a multiple of 64
    assert isinstance(tok, ByteTokenizer) and info["step"] == 4
    run = read_json(tmp_path / "run" / "run.json")
    assert run["config"]["train"] == cfg.to_dict() and run["hcomposer_version"]
    assert run["config"]["precision"] == "bf16"
    ds = prepare_dataset(cfg.data, tok)
    batches = ds.eval_batches(4, cfg.seq_len, cfg.eval_tokens)
    val = evaluate(lambda x, y: (model(x), y), batches, device=torch.device("cpu"), dtype=cfg.dtype)
    assert val.loss == pytest.approx(res.val_loss)
    # A kill between the two renames of a checkpoint save leaves only .checkpoint.old.
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / ".checkpoint.old")
    again, *_ = load_run(tmp_path / "run")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )


def test_auto_dtype_resolves_by_native_bf16(monkeypatch):
    from hcomposer.training import step

    assert TrainConfig().dtype == "auto"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert step.resolve_dtype("auto", "cpu") == want
        assert step.resolve_dtype("fp32", "cpu") == "fp32"
        assert step.resolve_dtype("bf16", "cpu") == "bf16"
        with step.autocast("cpu", "auto"):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert out.dtype == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(UserError, match="dtype 'fp16'"):
        TrainConfig(dtype="fp16")


def test_divergence_is_recorded_not_raised(tmp_path, text_file, monkeypatch):
    # The loss turns non-finite at the second step. (A learning rate of 1e30 used to force
    # this; the field's range, lr <= 10, now refuses it, and no legal rate is sure to overflow
    # a tiny model within a few steps.)
    real, calls = trainer_module.lm_loss, []

    def loss(logits, targets):
        calls.append(1)
        out = real(logits, targets)
        return out * float("nan") if len(calls) > 1 else out

    monkeypatch.setattr(trainer_module, "lm_loss", loss)
    cfg = _config(text_file, warmup=0, grad_clip=1.0)
    res = train(Architecture.parse("AF", shape="tiny"), cfg, tmp_path / "run", progress=False)
    assert res.status == "diverged"
    status = read_json(tmp_path / "run" / "status.json")
    k = status["step"]
    assert status == {"status": "diverged", "step": k, "message": f"diverged at step {k}"}
    assert 1 < k <= 3


def test_output_folder_rules(tmp_path, text_file):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file, tokens=128)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False)
    before = _snapshot(out)
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        train(arch, cfg, out, progress=False)
    with pytest.raises(UserError, match="holds a run of AF"):
        train(Architecture.parse("FA", shape="tiny"), cfg, out, resume=True, progress=False)
    with pytest.raises(UserError, match="other settings \\(lr\\)"):
        train(arch, cfg.replace(lr=1e-2), out, resume=True, progress=False)
    text_file.write_text(text_file.read_text()[:-10])
    with pytest.raises(UserError, match="data of the run .* changed"):
        train(arch, cfg, out, resume=True, progress=False)
    assert _snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no hcomposer run"):
        train(arch, cfg, other, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_damaged_checkpoint_is_refused(tmp_path, text_file, damage):
    arch = Architecture.parse("AF", shape="tiny")
    cfg = _config(text_file, tokens=4 * 128)
    out = tmp_path / "run"
    train(arch, cfg, out, progress=False, stop_at=2)
    weights = out / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(data[:-8] + bytes(8))
    before = _snapshot(out)
    with pytest.raises(UserError, match="damaged: model.safetensors fails its sha256"):
        train(arch, cfg, out, resume=True, progress=False)
    with pytest.raises(UserError, match="damaged"):
        load_run(out)
    assert _snapshot(out) == before


def test_shards_of_another_tokenizer_are_refused(tmp_path, text_file):
    ds = prepare_dataset(str(text_file), ByteTokenizer(), cache_dir=tmp_path / "shards")
    cfg = _config(text_file, data=str(ds.path), tokenizer="bpe:300", tokens=128)
    with pytest.raises(UserError, match="made with tokenizer 'byte'"):
        train(Architecture.parse("AF", shape="tiny"), cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_train_json_and_bad_inputs(tmp_path, text_file, capsys):
    common = ["--shape", "tiny", "--tokens", "256", "--batch-size", "2", "--seq-len", "32"]
    common += ["--eval-tokens", "64", "--dtype", "fp32"]
    out = tmp_path / "run"
    rc, stdout, _ = _cli(
        capsys, "train", "AF", *common, "--data", str(text_file), "--out", str(out), "--json"
    )
    assert rc == 0
    result = json.loads(stdout)
    assert result["status"] == "completed" and result["step"] == 4
    assert read_json(out / "architecture.json")["shape"]["vocab_size"] == 320
    # --batch-threads 0 (the default) resolved by the policy: a split on a 2-4 core CPU
    from hcomposer.threads import auto_batch_threads, usable_cores

    expected = auto_batch_threads(
        usable=usable_cores(), cpu=True, threads=0, rows=2, excluded=False
    )
    assert read_json(out / "run.json")["config"]["batch_threads"] == expected
    # A folder holding architecture.json (here the run itself) is accepted as the architecture.
    rc, stdout, _ = _cli(
        capsys,
        "train",
        str(out),
        "--tokens",
        "64",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-tokens",
        "64",
        "--data",
        str(text_file),
        "--out",
        str(tmp_path / "again"),
        "--json",
    )
    assert rc == 0 and json.loads(stdout)["step"] == 1
    assert read_json(tmp_path / "again" / "architecture.json")["pattern"] == "AF"
    # Bad input: exit 2, one line, nothing written.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\xff" * 100)
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(binary)], "binary"),
    ]
    for extra, msg in cases:
        rc, stdout, err = _cli(
            capsys, "train", "AF", *common, *extra, "--out", str(tmp_path / "new")
        )
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    rc, _, err = _cli(capsys, "train", "AF", *common, "--data", str(text_file), "--out", str(out))
    assert rc == 2 and "--resume" in err


def test_batch_threads_train_like_the_plain_step(tmp_path, text_file, monkeypatch):
    # The split step's gradients equal the plain ones up to rounding (tests/test_split_step.py);
    # here the whole trainer: same losses within fp32 rounding, the split recorded in run.json,
    # one intra-op thread while it runs and the caller's thread count restored afterwards.
    from hcomposer.training import trainer

    asked = []

    def spy(*args, **kw):
        asked.append(kw["batch_threads"])
        return train_step(*args, **kw)

    monkeypatch.setattr(trainer, "train_step", spy)
    arch = Architecture.parse("AF", shape="tiny")
    plain = train(arch, _config(text_file, tokens=3 * 128), tmp_path / "one", progress=False)
    threads_before = torch.get_num_threads()
    cfg = _config(text_file, tokens=3 * 128, batch_threads=2, grad_accum=2, batch_size=6)
    split_ref = _config(text_file, tokens=3 * 128, grad_accum=2, batch_size=6)
    asked.clear()
    split = train(arch, cfg, tmp_path / "two", progress=False)
    assert asked == [2, 2]
    ref = train(arch, split_ref, tmp_path / "ref", progress=False)
    assert torch.get_num_threads() == threads_before
    assert plain.status == split.status == ref.status == "completed"
    la, lb = _losses(tmp_path / "ref"), _losses(tmp_path / "two")
    assert la.keys() == lb.keys() and len(la) == 2
    for k in la:
        assert lb[k] == pytest.approx(la[k], abs=1e-5)
    assert split.val_loss == pytest.approx(ref.val_loss, abs=1e-5)
    run = read_json(tmp_path / "two" / "run.json")
    assert run["config"]["batch_threads"] == 2 and run["config"]["threads"] == 1
    assert run["config"]["train"]["batch_threads"] == 2
    assert {r["threads"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")} == {1}


def test_batch_threads_validation(tmp_path, text_file):
    base = {"tokens": 1000, "batch_size": 2, "seq_len": 8}
    assert TrainConfig(**base).batch_threads == 1
    bad = [
        dict(batch_threads=0),
        dict(batch_threads=True),
        dict(batch_threads="2"),
        dict(batch_threads=2, threads=2),
        dict(batch_threads=2, compile=True),
        dict(batch_threads=2, fsdp=True),
    ]
    for kw in bad:
        with pytest.raises(UserError, match="batch_threads"):
            TrainConfig(**base, **kw)
    for ok in (dict(threads=0), dict(threads=1), dict(threads=None)):
        assert TrainConfig(**base, batch_threads=2, **ok).batch_threads == 2
    with pytest.raises(UserError, match="batch_threads"):
        TrainConfig.from_dict({**base, "batch_threads": 10**6})
    # MoE layers update shared routing state in their forward: refused before anything is written.
    cfg = _config(text_file, batch_threads=2)
    with pytest.raises(UserError, match="E layers"):
        train(Architecture.parse("AE", shape="tiny"), cfg, tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists()


def test_a_blown_up_loss_has_no_perplexity_and_still_serialises(tmp_path):
    import json

    from hcomposer.training.trainer import TrainResult

    base = dict(out_dir=tmp_path, status="completed", step=1, tokens=1, loss=1.0,
                wall_seconds=1.0, tokens_per_second=1.0, params_total=1)  # fmt: skip
    assert TrainResult(val_loss=2.0, **base).to_dict()["val_ppl"] == pytest.approx(7.389056)
    for bad in (800.0, float("inf"), float("nan"), None):
        d = TrainResult(val_loss=bad, **base).to_dict()
        assert d["val_ppl"] is None
        json.dumps(d["val_ppl"], allow_nan=False)
