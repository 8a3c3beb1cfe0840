"""A and W against a naive softmax attention written here; rolling cache; Llama equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from hcomposer import build_model
from hcomposer.primitives.attention import Attention, RollingKVCache, SlidingWindowAttention
from hcomposer.shapes import get_shape

TINY = get_shape("tiny")


def _rope_complex(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE of x [B, H, T, hd] written as a complex rotation of (x_i, x_{i+hd/2}) pairs."""
    hd = x.shape[-1]
    half = hd // 2
    pos = torch.arange(x.shape[2], dtype=torch.float64)
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), pos[:, None] * freq)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def naive_attention(prim, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d) + band mask) v, one head at a time, then the output projection."""
    B, T, _ = x.shape
    hd, H, Hkv = prim.head_dim, prim.n_heads, prim.n_kv_heads
    q = (x @ prim.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ prim.k_proj.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    v = (x @ prim.v_proj.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    q, k = _rope_complex(q, prim.theta), _rope_complex(k, prim.theta)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    heads = []
    for h in range(H):
        g = h // (H // Hkv)  # query head h reads KV head g (grouped-query attention)
        s = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(s, dim=-1) @ v[:, g])
    y = torch.stack(heads, dim=2).reshape(B, T, H * hd)
    return y @ prim.o_proj.weight.T


def _prim(cls, seed=0, **changes):
    torch.manual_seed(seed)
    return cls(TINY.replace(**changes))


@pytest.mark.parametrize(
    "cls, window", [(Attention, None), (SlidingWindowAttention, 16), (SlidingWindowAttention, 5)]
)
def test_equals_naive_attention_outputs_and_gradients(cls, window):
    prim = _prim(cls, window=window or TINY.window)
    x = torch.randn(2, 40, TINY.d_model, requires_grad=True)
    y = prim(x)
    y_ref = naive_attention(prim, x, window)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(y)
    params = [x, *prim.parameters()]
    g = torch.autograd.grad((y * w).sum(), params)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_window_actually_limits_context():
    # Changing a token more than `window` steps back must not change W's output; A's does.
    w = 6
    x = torch.randn(1, 20, TINY.d_model)
    x2 = x.clone()
    x2[:, 3] += 1.0
    sw = _prim(SlidingWindowAttention, window=w)
    full = _prim(Attention)
    torch.testing.assert_close(sw(x)[:, 3 + w :], sw(x2)[:, 3 + w :])
    assert not torch.allclose(sw(x)[:, 3 + w - 1], sw(x2)[:, 3 + w - 1])
    assert not torch.allclose(full(x)[:, -1], full(x2)[:, -1])


def test_rolling_cache_stays_at_window_and_matches_full():
    w = TINY.window
    prim = _prim(SlidingWindowAttention).eval()
    T = 3 * w + 5
    x = torch.randn(2, T, TINY.d_model)
    full = prim(x)
    cache = prim.init_cache(2, T)
    assert isinstance(cache, RollingKVCache)
    numel, ptr = cache.k.numel(), cache.k.data_ptr()
    outs = []
    for t in range(T):
        outs.append(prim(x[:, t : t + 1], cache=cache))
        assert cache.k.shape == (2, prim.n_kv_heads, w, prim.head_dim)
        assert cache.v.shape == cache.k.shape
        assert cache.k.numel() == numel and cache.k.data_ptr() == ptr
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [Attention, SlidingWindowAttention])
@pytest.mark.parametrize("chunks", [(40,), (1,) * 40, (21, 1, 1, 17), (3, 16, 2, 19), (17, 23)])
def test_chunked_prefill_equals_full(cls, chunks):
    prim = _prim(cls).eval()
    x = torch.randn(1, sum(chunks), TINY.d_model)
    full = prim(x)
    cache = prim.init_cache(1, x.shape[1])
    outs, start = [], 0
    for n in chunks:
        outs.append(prim(x[:, start : start + n], cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)


def test_global_cache_overflow_is_an_error():
    prim = _prim(Attention)
    cache = prim.init_cache(1, 4)
    prim(torch.randn(1, 4, TINY.d_model), cache=cache)
    with pytest.raises(ValueError, match="holds 4"):
        prim(torch.randn(1, 1, TINY.d_model), cache=cache)


def hcomposer_to_llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Map a plain ``(AF)*n`` HybridLM's weights to ``LlamaForCausalLM`` names.

    Sublayer 2i (A) is Llama layer i's attention with ``input_layernorm``; sublayer 2i+1 (F)
    is its MLP with ``post_attention_layernorm``. The rotary convention is the same.
    """
    pattern = model.arch.pattern
    if pattern != "AF" * (len(pattern) // 2):
        raise ValueError(f"only (AF)*n maps onto Llama, got {pattern!r}")
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i in range(len(pattern) // 2):
        attn, mlp = model.layers[2 * i], model.layers[2 * i + 1]
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = attn.norm.weight
        sd[pre + "post_attention_layernorm.weight"] = mlp.norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{name}.weight"] = getattr(attn.mixer, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[pre + f"mlp.{name}.weight"] = getattr(mlp.mixer.ffn, name).weight
    if not model.arch.shape.tie_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().clone() for k, v in sd.items()}


def llama_config(shape, n_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_seq_len,
        rms_norm_eps=shape.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )


@pytest.mark.parametrize("tie, theta", [(True, 10000.0), (False, 500000.0)])
def test_plain_transformer_equals_transformers_llama(tie, theta):
    transformers = pytest.importorskip("transformers")
    shape = TINY.replace(tie_embeddings=tie, rope_theta=theta, norm_eps=1e-6)
    ours = build_model("(AF)*2", shape=shape, seed=3).eval()
    # Norm scales of 1 would hide a swapped norm: make them distinct.
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    cfg = llama_config(shape, 2)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = ref.load_state_dict(hcomposer_to_llama_state_dict(ours), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (tie or not missing)
    tokens = torch.randint(0, shape.vocab_size, (2, 37))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
