"""Loading a teacher: a tiny Llama saved by transformers (safetensors) comes back as our model
with the exact parameter count and transformers' own logits; what the mapping cannot express
is refused in one line."""

from __future__ import annotations

import pytest
import torch

from hcomposer.convert import load_teacher
from hcomposer.errors import UserError

transformers = pytest.importorskip("transformers")


def _tiny_llama(tmp_path, *, tie=False, cls="Llama", **overrides):
    config_cls = getattr(transformers, f"{cls}Config")
    model_cls = getattr(transformers, f"{cls}ForCausalLM")
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = model_cls(config_cls(**kwargs)).eval()
    folder = tmp_path / f"{cls.lower()}-tie{int(tie)}"
    hf.save_pretrained(folder)  # safetensors by default
    return hf, folder


@pytest.mark.parametrize("tie", [False, True])
def test_llama_teacher_logits_and_params_equal_transformers(tmp_path, tie):
    hf, folder = _tiny_llama(
        tmp_path, tie=tie, rope_parameters={"rope_type": "default", "rope_theta": 5e4}
    )
    teacher = load_teacher(folder)
    assert teacher.arch.pattern == "AFAFAF"
    assert teacher.attention_layers == [0, 2, 4]
    assert teacher.arch.shape.rope_theta == 5e4
    assert sum(p.numel() for p in teacher.model.parameters()) == hf.num_parameters()
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = teacher.model(tokens)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_mistral_without_window_loads(tmp_path):
    hf, folder = _tiny_llama(tmp_path, cls="Mistral", sliding_window=None, head_dim=32)
    teacher = load_teacher(folder)
    assert teacher.arch.shape.head_dim == 32
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("cls", "option", "names"),
    [("Qwen2", "attn_bias", ("q_proj.bias", "k_proj.bias", "v_proj.bias")),
     ("Qwen3", "qk_norm", ("q_norm.weight", "k_norm.weight"))],
)  # fmt: skip
def test_qwen_teachers_logits_and_params_equal_transformers(tmp_path, cls, option, names):
    hf, folder = _tiny_llama(tmp_path, cls=cls, head_dim=16)
    # Biases start at zero and norm scales at one in a fresh model: draw them, so that a
    # dropped bias or norm shows in the logits.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(names):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(folder)
    teacher = load_teacher(folder)
    shape = teacher.arch.shape
    assert (shape.attn_bias, shape.qk_norm) == (option == "attn_bias", option == "qk_norm")
    assert teacher.attention_layers == [0, 2, 4]
    assert sum(p.numel() for p in teacher.model.parameters()) == hf.num_parameters()
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


def test_qwen2_sliding_window_flag_covering_no_layer_loads(tmp_path):
    # use_sliding_window with max_window_layers >= the depth: every layer is full attention.
    hf, folder = _tiny_llama(
        tmp_path, cls="Qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=3
    )
    teacher = load_teacher(folder)
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("cls", "overrides", "words"),
    [
        (
            "Llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type 'linear'",
        ),
        ("Llama", {"attention_bias": True}, "attention_bias"),
        ("Llama", {"mlp_bias": True}, "mlp_bias"),
        ("Llama", {"hidden_act": "gelu"}, "hidden_act"),
        (
            "Qwen2",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
            "sliding window of 16 tokens on layers 1..2",
        ),
        (
            "Qwen2",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type 'yarn'",
        ),
        ("Qwen3", {"head_dim": 16, "attention_bias": True}, "attention_bias = True"),
        ("Mistral", {"sliding_window": 32}, "sliding window of 32"),
    ],
)
def test_unsupported_features_refused_in_one_line(tmp_path, cls, overrides, words):
    _, folder = _tiny_llama(tmp_path, cls=cls, **overrides)
    with pytest.raises(UserError) as err:
        load_teacher(folder)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_pickled_weights_and_non_model_folders_refused(tmp_path):
    _, folder = _tiny_llama(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UserError, match="pickles"):
        load_teacher(pickled)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither a Hugging Face model folder"):
        load_teacher(empty)
    with pytest.raises(UserError, match="not a folder"):
        load_teacher(tmp_path / "missing")
