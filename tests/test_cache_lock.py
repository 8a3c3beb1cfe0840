"""Two processes asking at once for the same token shards, or the same trained BPE, build it
once (a lock beside the cache entry) and both get the same result."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

import hcomposer.io
from hcomposer.data import ByteTokenizer, embedded_corpus_text, prepare_dataset
from hcomposer.io import entry_lock

# How long a counted build sleeps before building: long enough that without the lock the
# second process, released by the same barrier, would start its own build meanwhile.
_HOLD_SECONDS = 1.0


def _counted(real, marker: str):
    """``real``, first appending this process's id to ``marker`` (one line per build)."""

    def build(*args, **kwargs):
        with open(marker, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(_HOLD_SECONDS)
        return real(*args, **kwargs)

    return build


def _prepare(corpus: str, cache: str, marker: str, out: str, barrier) -> None:
    from hcomposer.data import shards

    shards._build = _counted(shards._build, marker)
    barrier.wait()
    ds = shards.prepare_dataset(corpus, ByteTokenizer(), cache_dir=cache)
    result = {"path": str(ds.path), "sha256": ds.manifest["sha256"], "train": ds.train.tolist()}
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def _train_bpe(corpus: str, cache: str, marker: str, out: str, barrier) -> None:
    from hcomposer.data import get_tokenizer, tokenizers

    tokenizers.train_bpe = _counted(tokenizers.train_bpe, marker)
    barrier.wait()
    tok = get_tokenizer("bpe:300", source=corpus, cache_dir=cache)
    result = {"identity": tok.identity, "ids": tok.encode("It is a truth universally")}
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def _race(target, tmp_path: Path) -> tuple[list[str], list[dict]]:
    """Run ``target`` in two spawned processes released together; the builds they counted and
    what each returned."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_corpus_text()[:30_000], encoding="utf-8")
    marker = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [
        ctx.Process(
            target=target, args=(str(corpus), str(tmp_path / "cache"), str(marker), str(o), barrier)
        )
        for o in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    builds = marker.read_text(encoding="utf-8").split() if marker.exists() else []
    return builds, [json.loads(o.read_text(encoding="utf-8")) for o in outs]


@pytest.mark.slow
def test_parallel_jobs_build_the_token_shards_once(tmp_path):
    builds, (a, b) = _race(_prepare, tmp_path)
    assert len(builds) == 1
    assert a == b and a["train"]
    # The result is the ordinary cache entry: a later call reuses it.
    again = prepare_dataset(str(tmp_path / "corpus.txt"), ByteTokenizer(), tmp_path / "cache")
    assert str(again.path) == a["path"] and again.manifest["sha256"] == a["sha256"]


@pytest.mark.slow
def test_parallel_jobs_train_the_bpe_once(tmp_path):
    builds, (a, b) = _race(_train_bpe, tmp_path)
    assert len(builds) == 1
    assert a == b and a["ids"]


def _hold(entry: str, held: str) -> None:
    with entry_lock(entry):
        Path(held).touch()
        time.sleep(600)


def test_a_killed_holder_does_not_block_and_a_waiter_says_so(tmp_path, capfd, monkeypatch):
    """A process killed while building releases the lock (the next one builds); the waiting
    process says once on stderr what it waits for; with no entry built, no lock file stays."""
    entry, held = tmp_path / "tokens" / "entry", tmp_path / "held"
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold, args=(str(entry), str(held))
    )
    killed = []

    def say_then_kill(*args, **kwargs):
        # The holder is killed only once this process has found the lock taken and said so.
        print(*args, **kwargs)
        holder.kill()
        killed.append(True)

    monkeypatch.setattr(hcomposer.io, "print", say_then_kill, raising=False)
    holder.start()
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert time.monotonic() < deadline and holder.is_alive()
            time.sleep(0.02)
        with entry_lock(entry):
            assert killed == [True]
            holder.join(timeout=60)
            assert holder.exitcode is not None and holder.exitcode < 0
    finally:
        holder.kill()
        holder.join(timeout=60)
    err = capfd.readouterr().err
    assert err.count(f"waiting for another process building {entry}") == 1
    # Nothing was built: the lock file is gone too.
    assert list((tmp_path / "tokens").iterdir()) == []
