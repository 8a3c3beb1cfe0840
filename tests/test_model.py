"""The model: cached decoding equals the full forward, seeds, generation, fusions, bf16."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import HAS_MAMBA, MIXERS, TOKENS, decode_stepwise, random_pattern, requires_mamba
from hcomposer import Architecture, build_model
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")
# Longer than tiny's window (16) and SSM chunk (16): the rolling cache wraps.
T = 20


def _tokens(seed: int, batch: int = 2, length: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=g)


def _check_decoding(pattern: str, seed: int, prefill: int, shape=TINY) -> None:
    model = build_model(pattern, shape=shape, seed=seed).eval()
    tokens = _tokens(seed)
    with torch.no_grad():
        full = model(tokens)
        stepwise = decode_stepwise(model, tokens)
        # Prefill, then a few decoded tokens (the model is causal: compare that prefix).
        end = min(T, prefill + 4)
        split = decode_stepwise(model, tokens[:, :end], prefill=prefill)
    torch.testing.assert_close(stepwise, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(split, full[:, :end], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("token", ["A", "W", "F", "E", pytest.param("S", marks=requires_mamba)])
def test_every_primitive_decodes_like_full_forward(token):
    _check_decoding(f"{token}F{token}" if token not in "FE" else f"A{token}", 0, prefill=T // 2)


def _perturb_qwen_options(model) -> int:
    """Random q/k/v biases and q/k norm scales (they start at 0 and 1, a no-op); how many."""
    g = torch.Generator().manual_seed(7)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                n += 1
    return n


@pytest.mark.parametrize(
    "options", [{"attn_bias": True}, {"qk_norm": True}, {"attn_bias": True, "qk_norm": True}]
)
def test_attention_bias_and_qk_norm_decode_like_full_forward(options):
    shape = TINY.replace(**options)
    model = build_model("AFWF[A|W]F", shape=shape, seed=3).eval()
    # 4 attention modules (A, W, and a group of two): 3 biases and/or 2 norms each.
    assert _perturb_qwen_options(model) == 4 * (3 * shape.attn_bias + 2 * shape.qk_norm)
    tokens = _tokens(3)
    with torch.no_grad():
        full = model(tokens)
        stepwise = decode_stepwise(model, tokens)
        split = decode_stepwise(model, tokens[:, :14], prefill=9)
        plain = build_model("AFWF[A|W]F", shape=TINY, seed=3).eval()(tokens)
    torch.testing.assert_close(stepwise, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(split, full[:, :14], atol=2e-5, rtol=1e-4)
    assert (full - plain).abs().max() > 1e-3  # the options change the model


def _random_patterns(n: int = 20, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [random_pattern(rng) for _ in range(n)]


@pytest.mark.parametrize("i, pattern", list(enumerate(_random_patterns())))
def test_random_patterns_decode_like_full_forward(i, pattern):
    _check_decoding(pattern, seed=i, prefill=1 + (7 * i) % (T - 1))


def test_random_patterns_cover_every_primitive_and_groups():
    patterns = "".join(_random_patterns())
    for tok in TOKENS:
        assert tok in patterns
    assert "[" in patterns


@pytest.mark.parametrize("fusion", ["diff", "concat", "add"])
def test_group_fusions_decode_like_full_forward(fusion):
    groups = "[A|W]F[W|A]E[A|A]" + ("[A|S]F[S|W]" if HAS_MAMBA else "")
    _check_decoding(groups, seed=5, prefill=9, shape=TINY.replace(fusion=fusion))


def test_fusions_differ():
    tokens = _tokens(0)
    outs = [
        build_model("[A|W]F", shape=TINY.replace(fusion=f), seed=0)(tokens)
        for f in ("diff", "add", "concat")
    ]
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_decoding_one_batch_row_at_a_time_equals_batched():
    model = build_model("AW" + MIXERS[-1] + "E", seed=0).eval()
    tokens = _tokens(1, batch=3)
    with torch.no_grad():
        both = decode_stepwise(model, tokens, prefill=5)
        rows = [decode_stepwise(model, tokens[i : i + 1], prefill=5) for i in range(3)]
    torch.testing.assert_close(torch.cat(rows), both, atol=2e-5, rtol=1e-4)


def test_same_seed_same_model_different_seed_different():
    pattern = "AWFE[A|W]" + ("S" if HAS_MAMBA else "")
    tokens = _tokens(0)
    a = build_model(pattern, seed=7)(tokens)
    b = build_model(pattern, seed=7)(tokens)
    c = build_model(pattern, seed=8)(tokens)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    sd_a = build_model(pattern, seed=7).state_dict()
    sd_b = build_model(pattern, seed=7).state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_generate_greedy_equals_repeated_full_forward():
    model = build_model("AFWE" + ("S" if HAS_MAMBA else ""), seed=2).eval()
    prompt = _tokens(3, batch=2, length=5)
    out = model.generate(prompt, max_new_tokens=12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_reproducible_and_respects_top_k():
    model = build_model("AF", seed=2).eval()
    prompt = _tokens(3, batch=2, length=4)

    def sample(seed, top_k=None):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 10, temperature=1.0, top_k=top_k, generator=g)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    # top_k=1 sampling is greedy.
    assert torch.equal(sample(4, top_k=1), model.generate(prompt, 10))


def test_generate_stops_at_eos():
    model = build_model("AF", seed=2).eval()
    prompt = _tokens(3, batch=1, length=4)
    greedy = model.generate(prompt, 6)
    eos = int(greedy[0, 5])  # the second generated token
    out = model.generate(prompt, 6, eos_token_id=eos)
    assert out.shape[1] <= greedy.shape[1]
    assert int(out[0, -1]) == eos


def test_tied_and_untied_heads():
    tied = build_model("AF", seed=0)
    assert tied.lm_head.weight is tied.embed.weight
    untied = build_model("AF", shape=TINY.replace(tie_embeddings=False), seed=0)
    assert untied.lm_head.weight is not untied.embed.weight


def test_loss_and_bf16_autocast_close_to_fp32():
    pattern = "AWFE[A|W]" + ("S" if HAS_MAMBA else "")
    model = build_model(pattern, seed=0)
    tokens = _tokens(0)
    targets = torch.roll(tokens, -1, dims=1)
    loss32 = model.loss(tokens, targets)
    # A fresh model predicts close to uniform.
    assert abs(loss32.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model.loss(tokens, targets)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 2e-2
    loss16.backward()
    moe = model.layers[3].mixer
    for name, p in model.named_parameters():
        if p.grad is None:
            # Only an expert that received no token this step may lack a gradient.
            assert name.startswith("layers.3.mixer.experts."), name
            assert int(moe.last_load[int(name.split(".")[4])]) == 0, name
        else:
            assert torch.isfinite(p.grad).all(), name


def test_bf16_weights_decode_close_to_full():
    model = build_model("AWFE", seed=0, dtype=torch.bfloat16).eval()
    tokens = _tokens(0)
    with torch.no_grad():
        full = model(tokens).float()
        step = decode_stepwise(model, tokens, prefill=7).float()
    assert (full - step).abs().max() < 0.1 * full.abs().max()


def test_bad_inputs():
    model = build_model("AF")
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(5, dtype=torch.long))
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_build_from_architecture_or_pattern():
    arch = Architecture.parse("(AF)*2", shape="tiny")
    assert build_model(arch).arch == build_model("(AF)*2", shape="tiny").arch
    assert len(build_model(arch).layers) == 4
