"""The contract every registered primitive keeps (hcomposer.primitive_specs is the registry).

For each primitive: forward and backward shapes, cached decoding equal to the full forward
(also as a branch of a parallel group, for mixers), its declared parameter count equal to the
built module's (alone, as a branch, and in whole models through ``params_from_shape``), its
declared cache bytes equal to the tensors its cache holds, random patterns that include it,
and (for the package's own primitives) an export round trip through Hugging Face.

The last tests register a toy primitive, ``Z`` (a causal token shift), from this file alone,
and run it through the same checks: adding a primitive is one file plus one registry line.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from conftest import decode_stepwise, run_pieces, tensor_bytes
from hcomposer.accounting import count_costs, params_from_shape
from hcomposer.architecture import Architecture
from hcomposer.errors import PatternError
from hcomposer.model import build_model
from hcomposer.pattern import MIXER_TOKENS, TOKENS, parse_pattern, to_megatron
from hcomposer.primitive_specs import SPECS, PrimitiveSpec, register, unregister
from hcomposer.primitives import Primitive, primitive_class
from hcomposer.primitives.base import Linear
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")
BUILTIN = list(SPECS)
T = 24


def _pattern(tok: str) -> str:
    """A small pattern holding ``tok``: mixers beside an MLP, feed-forwards beside attention."""
    return f"{tok}F{tok}" if SPECS[tok].mixer else f"A{tok}"


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_forward_backward(tok: str) -> None:
    model = build_model(_pattern(tok), shape=TINY, seed=0)
    x = torch.randint(0, TINY.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    logits = model(x)
    assert logits.shape == (2, T, TINY.vocab_size)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    cls = primitive_class(tok)
    layers = [b.mixer for b in model.layers if isinstance(b.mixer, cls)]
    assert layers, f"{tok} was not built"
    grads = [p.grad for m in layers for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), f"{tok} gets no gradient"
    # A primitive alone maps [B, T, d] to [B, T, d].
    m = cls(TINY).double()
    assert m(torch.randn(2, T, TINY.d_model, dtype=torch.float64)).shape == (2, T, TINY.d_model)


def check_decoding(tok: str) -> None:
    patterns = [_pattern(tok)]
    if SPECS[tok].mixer:
        patterns.append(f"[{tok}|A]F")  # as a branch of a parallel group
    for pattern in patterns:
        model = build_model(pattern, shape=TINY, seed=1).double().eval()
        x = torch.randint(0, TINY.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(x)
            torch.testing.assert_close(decode_stepwise(model, x), full, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(
                decode_stepwise(model, x, prefill=T // 3), full, atol=1e-6, rtol=1e-5
            )
    m = primitive_class(tok)(TINY).double().eval()
    h = torch.randn(1, T, TINY.d_model, dtype=torch.float64)
    with torch.no_grad():
        whole = m(h)
        if m.init_cache(1, T) is not None:
            torch.testing.assert_close(run_pieces(m, h, [5, 1, 1, T - 7]), whole)


def check_param_count(tok: str) -> None:
    cls = primitive_class(tok)
    for shape in (TINY, get_shape("proxy"), get_shape("2m")):
        assert cls.param_count(shape) == _count(cls(shape)), (tok, shape.name)
        if SPECS[tok].mixer:
            as_branch = cls(shape, fraction=0.5, project=False)
            assert cls.param_count(shape, fraction=0.5, project=False) == _count(as_branch)
        for pattern in (_pattern(tok), f"[{tok}|A]F" if SPECS[tok].mixer else f"{tok}AF"):
            arch = Architecture.parse(pattern, shape)
            assert params_from_shape(arch) == count_costs(arch).params_total, pattern


def check_cache_bytes(tok: str) -> None:
    """kv_bytes_per_token x length + state_bytes equals what the cache holds (fp32 and bf16)."""
    m = primitive_class(tok)(TINY)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        for length in (16, 32):
            cache = m.init_cache(1, length, dtype=dtype)
            held = tensor_bytes(cache)
            declared = m.kv_bytes_per_token(size) * length + m.state_bytes(size)
            # Recurrent states may be kept in fp32 whatever the model's dtype: allow 2x.
            assert declared <= held <= 2 * declared or held == declared == 0, (tok, dtype)


def check_random_patterns(tok: str, n: int = 6) -> None:
    rng = random.Random(sum(map(ord, tok)))
    others = [t for t in TOKENS if t != tok]
    for _ in range(n):
        body = [rng.choice(others) for _ in range(rng.randint(1, 4))]
        body.insert(rng.randint(0, len(body)), tok)
        if SPECS[tok].mixer and rng.random() < 0.5:
            body.append(f"[{tok}|{rng.choice(list(MIXER_TOKENS))}]")
        pattern = "".join(body)
        arch = Architecture.parse(pattern, TINY)
        assert params_from_shape(arch) == count_costs(arch).params_total, pattern
        model = build_model(arch, seed=0).eval()
        x = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.isfinite(model(x)).all(), pattern


CHECKS = [check_forward_backward, check_decoding, check_param_count, check_cache_bytes,
          check_random_patterns]  # fmt: skip


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("tok", BUILTIN)
def test_builtin_primitive_keeps_the_contract(tok, check):
    check(tok)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tok", BUILTIN)
def test_export_round_trip(tok, tmp_path):
    """Every primitive exports to a Hugging Face folder that reproduces our logits."""
    from transformers import AutoModelForCausalLM

    import hcomposer.hf  # noqa: F401  (registers model_type "hcomposer")
    from hcomposer.data import get_tokenizer
    from hcomposer.export import export_model
    from hcomposer.training.trainer import vocab_for

    tokenizer = get_tokenizer("byte")
    shape = TINY.replace(vocab_size=vocab_for(tokenizer))
    arch = Architecture.parse(_pattern(tok), shape)
    model = build_model(arch, seed=3).eval()
    export_model(model, arch, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_registry_facts_are_consistent():
    for tok, s in SPECS.items():
        assert s.token == tok and TOKENS[tok] == s.name
        cls = primitive_class(tok)
        assert issubclass(cls, Primitive)
        assert cls.token == tok and cls.is_mixer == s.mixer
        for field in s.options + s.split_fields:
            assert hasattr(TINY, field), (tok, field)
        assert s.colour.startswith("#") and len(s.colour) == 7
    letters = [s.megatron for s in SPECS.values() if s.megatron]
    assert len(letters) == len(set(letters))


# ---------------------------------------------------------------- a toy primitive, registered


class TokenShift(Primitive):
    """Z: y = P([x_t, x_{t-1}]) — a causal token shift, the smallest stateful mixer. Its
    letter and that it is a mixer are read from its registry entry, not written here."""

    def __init__(self, shape, *, fraction: float = 1.0, project: bool = True):
        super().__init__(shape, fraction=fraction, project=project)
        d = shape.d_model
        self.inner_dim = max(1, round(d * fraction))
        self.mix = Linear(2 * d, self.inner_dim, bias=False)
        if project:
            self.out = Linear(self.inner_dim, d, bias=False)

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        return _ShiftCache(
            torch.zeros(batch_size, 1, self.shape.d_model, device=device, dtype=dtype)
        )

    def forward(self, x, cache=None):
        prev = torch.zeros_like(x[:, :1]) if cache is None else cache.last.to(x.dtype)
        shifted = torch.cat([prev, x[:, :-1]], dim=1)
        if cache is not None:
            cache.last = x[:, -1:].detach().clone()
            cache.pos += x.shape[1]
        y = self.mix(torch.cat([x, shifted], dim=-1))
        return self.out(y) if self.project else y

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        return self.shape.d_model * dtype_bytes


class _ShiftCache:
    def __init__(self, last):
        self.last = last
        self.pos = 0


@pytest.fixture
def toy():
    register(PrimitiveSpec(token="Z", name="token shift", module=__name__, cls="TokenShift",
                           mixer=True, colour="#17becf"))  # fmt: skip
    try:
        yield "Z"
    finally:
        unregister("Z")
    assert "Z" not in TOKENS


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_a_registered_toy_primitive_keeps_the_contract(toy, check):
    check(toy)


def test_a_registered_primitive_is_known_everywhere(toy, tmp_path):
    from hcomposer.reporting.report import plot_pattern_strips

    assert parse_pattern("Z[Z|A]F") == [("Z",), ("Z", "A"), ("F",)]
    assert TOKENS["Z"] == "token shift" and "Z" in MIXER_TOKENS
    # The class knows its letter and kind from the entry alone (read when asked).
    assert (TokenShift.token, TokenShift.is_mixer) == ("Z", True)
    assert (TokenShift(TINY).token, TokenShift(TINY).is_mixer) == ("Z", True)
    # Its parameter count comes from the base class's meta-device default.
    assert TokenShift.param_count(TINY) == _count(TokenShift(TINY))
    with pytest.raises(PatternError, match="no symbol"):
        to_megatron("ZF")
    with pytest.raises(PatternError, match="taken"):
        register(PrimitiveSpec(token="Z", name="again", module=__name__, cls="TokenShift",
                               mixer=True))  # fmt: skip
    assert plot_pattern_strips([("toy", "ZFZF")], tmp_path / "s.png").stat().st_size > 0


def test_token_and_kind_come_from_the_registry():
    # Unregistered, a class has the base's placeholders; a subclass of a registered primitive
    # answers with its base's entry; a parallel group sets its own.
    assert (TokenShift.token, TokenShift.is_mixer) == ("?", False)
    assert (Primitive.token, Primitive.is_mixer) == ("?", False)

    class Variant(primitive_class("S")):
        pass

    assert (Variant.token, Variant.is_mixer) == ("S", True)
    assert [primitive_class(t).is_mixer for t in "AWFESD"] == [True, True, False, False, True, True]
    group = build_model("[A|D]F", shape=TINY, seed=0).layers[0].mixer
    assert group.token == "[A|D]" and group.is_mixer


def test_unknown_and_bad_tokens_are_refused():
    with pytest.raises(PatternError, match="Z"):
        parse_pattern("ZF")
    with pytest.raises(PatternError, match="one upper-case letter"):
        register(PrimitiveSpec(token="[", name="bad", module=__name__, cls="TokenShift",
                               mixer=True))  # fmt: skip
