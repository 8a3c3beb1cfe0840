"""Shared helpers for the model tests: which primitives exist, random patterns, cache sizes,
one-thread runs, seeded fp64 inputs and decoding in pieces."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random

import pytest
import torch

from hcomposer.primitive_specs import SPECS

# Test models are tiny: a second thread gains nothing on them, and on a busy machine the
# OpenMP workers spin-wait and burn CPU. One thread keeps the suite's CPU time honest.
torch.set_num_threads(1)

# Every registered primitive (hcomposer.primitive_specs, the one registry): random patterns
# draw from all of them, so a new primitive is in the random-pattern tests at once.
HAS_MAMBA = importlib.util.find_spec("hcomposer.primitives.mamba2") is not None
MIXERS = "".join(t for t, s in SPECS.items() if s.mixer)
TOKENS = MIXERS + "".join(t for t, s in SPECS.items() if not s.mixer)

requires_mamba = pytest.mark.skipif(
    not HAS_MAMBA, reason="hcomposer.primitives.mamba2 (S) is not there yet"
)


def random_pattern(rng: random.Random, n_min: int = 2, n_max: int = 6) -> str:
    """A random canonical pattern of the available tokens, with 2-branch groups now and then."""
    out = []
    for _ in range(rng.randint(n_min, n_max)):
        if rng.random() < 0.25:
            a, b = rng.choice(MIXERS), rng.choice(MIXERS)
            out.append(f"[{a}|{b}]")
        else:
            out.append(rng.choice(TOKENS))
    return "".join(out)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from a cache object (dataclasses, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return 0
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(o) for o in vars(obj).values())
    raise TypeError(f"cannot size cache object of type {type(obj)}")


def decode_stepwise(model, tokens: torch.Tensor, prefill: int = 0) -> torch.Tensor:
    """Logits from a prefill of ``prefill`` tokens then one token at a time through a cache."""
    B, T = tokens.shape
    cache = model.init_cache(B, T)
    outs = []
    if prefill:
        outs.append(model(tokens[:, :prefill], cache=cache))
    for t in range(prefill, T):
        outs.append(model(tokens[:, t : t + 1], cache=cache))
    assert cache.pos == T
    return torch.cat(outs, dim=1)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it (whatever an earlier test set).

    The primitive tests' tensors are tiny: on the shared 2-core machine a second OpenMP thread
    only adds spin-waiting (5x slower under load). Used with ``pytest.mark.usefixtures``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def f64_input(b: int, t: int, d: int, seed: int = 1) -> torch.Tensor:
    """A seeded fp64 input [b, t, d] for a primitive."""
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_pieces(m, x: torch.Tensor, sizes) -> torch.Tensor:
    """A primitive's outputs for ``x`` fed through one cache in pieces of ``sizes`` tokens."""
    cache = m.init_cache(x.shape[0], x.shape[1])
    outs, start = [], 0
    for s in sizes:
        outs.append(m(x[:, start : start + s], cache=cache))
        start += s
    assert start == x.shape[1] and cache.pos == start
    return torch.cat(outs, dim=1)


def pytest_terminal_summary(terminalreporter):
    """One line saying how many PostgreSQL tests ran (CI must show they were not skipped)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in counts:
        for rep in terminalreporter.stats.get(outcome, []):
            if "postgres" in getattr(rep, "keywords", {}) and (
                rep.when == "call" or outcome == "skipped"
            ):
                counts[outcome] += 1
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    terminalreporter.write_line(f"postgres tests: {summary}")


@pytest.fixture(scope="session")
def small_teacher(tmp_path_factory):
    """A run folder of ``(AF)*3`` (d_model 64, 4 query / 2 key-value heads, window 32) trained
    150 steps on 200K characters of the embedded corpus (about 10 s on one thread): a teacher
    whose attention layers did learn something, for the conversion tests."""
    from hcomposer.architecture import Architecture
    from hcomposer.data import embedded_corpus_text
    from hcomposer.training import TrainConfig, train

    root = tmp_path_factory.mktemp("teacher")
    text = root / "train.txt"
    text.write_text(embedded_corpus_text()[:200_000], encoding="utf-8")
    shape = dict(
        name="teacher", d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=320,
        max_seq_len=256, init_std=0.05, window=32,
    )  # fmt: skip
    config = TrainConfig(
        tokens=150 * 16 * 64, batch_size=16, seq_len=64, lr=3e-3, min_lr=3e-4, warmup=10,
        dtype="fp32", eval_every=0, eval_tokens=2048, log_every=50, checkpoint_every=0,
        data=str(text), threads=1,
    )  # fmt: skip
    old = os.environ.get("HCOMPOSER_CACHE")
    os.environ["HCOMPOSER_CACHE"] = str(root / "cache")
    try:
        train(Architecture.parse("AFAFAF", shape=shape), config, root / "run", progress=False)
    finally:
        if old is None:
            os.environ.pop("HCOMPOSER_CACHE")
        else:
            os.environ["HCOMPOSER_CACHE"] = old
    return root / "run"


@pytest.fixture
def convert_text(tmp_path, monkeypatch):
    """40K characters of the embedded corpus past the teacher's training text, with a
    private token cache: what the conversion tests distil on."""
    from hcomposer.data import embedded_corpus_text

    monkeypatch.setenv("HCOMPOSER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text(embedded_corpus_text()[200_000:240_000], encoding="utf-8")
    return path
