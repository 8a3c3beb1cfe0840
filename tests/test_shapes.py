"""Shapes: validation naming the field, presets, JSON round trips, Architecture."""

from __future__ import annotations

import json

import pytest

from hcomposer import Architecture
from hcomposer.errors import ShapeError, UserError
from hcomposer.shapes import PRESETS, Shape, get_shape, resolve_shape

TINY = PRESETS["tiny"]


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(d_model=65, head_dim=0), "n_heads"),  # heads must divide width
        (dict(n_kv_heads=3), "n_kv_heads"),  # kv heads must divide heads
        (dict(head_dim=15), "head_dim"),  # RoPE needs an even head dim
        (dict(d_model=0), "d_model"),
        (dict(ffn_dim=-4), "ffn_dim"),
        (dict(window=0), "window"),
        (dict(vocab_size=2.5), "vocab_size"),  # not an integer
        (dict(n_heads=True), "n_heads"),  # a bool is not an integer
        (dict(ssm_head_dim=48), "ssm_head_dim"),  # must divide expand*d_model=128
        (dict(ssm_groups=3), "ssm_groups"),  # must divide the 8 SSM heads
        (dict(top_k=5), "top_k"),  # more than n_experts=4
        (dict(n_experts=0), "n_experts"),
        (dict(router="relu"), "router"),
        (dict(moe_balance="aux"), "moe_balance"),
        (dict(fusion="mul"), "fusion"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
    ],
)
def test_each_rule_names_its_field(changes, field):
    with pytest.raises(ShapeError) as err:
        TINY.replace(**changes)
    assert field in (err.value.field or "")
    assert field in str(err.value)
    assert isinstance(err.value, UserError)
    assert "\n" not in str(err.value)


def test_head_dim_defaults_and_expert_width_default():
    s = Shape(d_model=96, n_heads=6, n_kv_heads=2, ffn_dim=256, vocab_size=10, max_seq_len=8)
    assert s.head_dim == 16
    assert s.expert_ffn_dim == 128
    assert s.ssm_inner == 192 and s.ssm_heads == 3


def test_replace_unknown_field():
    with pytest.raises(ShapeError, match="d_modle"):
        TINY.replace(d_modle=3)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    s = get_shape(name)
    assert s.name == name
    assert Shape.from_dict(s.to_dict()) == s
    assert Shape.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert resolve_shape(name) is s


def test_llama_presets_have_the_real_dimensions():
    one = get_shape("llama-3.2-1b")
    assert (one.d_model, one.n_heads, one.n_kv_heads, one.ffn_dim) == (2048, 32, 8, 8192)
    assert one.vocab_size == 128256 and one.tie_embeddings and one.rope_theta == 500000.0
    three = get_shape("llama-3.2-3b")
    assert (three.d_model, three.n_heads, three.head_dim) == (3072, 24, 128)
    eight = get_shape("llama-3.1-8b")
    assert (eight.d_model, eight.ffn_dim, eight.tie_embeddings) == (4096, 14336, False)


def test_unknown_preset_lists_presets():
    with pytest.raises(UserError) as err:
        get_shape("huge")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(UserError):
        resolve_shape("huge")


def test_json_file_round_trip(tmp_path):
    s = TINY.replace(name="mine", d_model=128, ffn_dim=256, router="softmax")
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(s.to_dict()))
    assert resolve_shape(path) == s
    assert resolve_shape(str(path)) == s
    # A file may start from a preset and override a few fields.
    path2 = tmp_path / "over.json"
    path2.write_text(json.dumps({"preset": "tiny", "window": 8}))
    assert resolve_shape(path2) == TINY.replace(window=8)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"d_model": 64}), "missing"),
        (json.dumps({**TINY.to_dict(), "colour": 1}), "colour"),
        (json.dumps({**TINY.to_dict(), "n_kv_heads": 3}), "n_kv_heads"),
    ],
)
def test_bad_json_files(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        resolve_shape(path)


def test_missing_json_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_shape(tmp_path / "nope.json")


def test_architecture_round_trip(tmp_path):
    arch = Architecture.parse("(AF)*2[A|S]E", shape="tiny")
    assert arch.pattern == "AFAF[A|S]E"
    assert Architecture.from_json(arch.to_json()) == arch
    path = tmp_path / "arch.json"
    path.write_text(arch.to_json())
    assert Architecture.from_json(path) == arch
    assert arch.with_shape("proxy").shape == get_shape("proxy")
    assert arch.counts() == {"A": 2, "F": 2, "[A|S]": 1, "E": 1}


def test_architecture_group_must_split_heads():
    # tiny has 4 heads and 2 KV heads: 3 branches split neither, 4 split only the heads.
    with pytest.raises(ShapeError) as err:
        Architecture.parse("[A|W|A]", shape="tiny")
    assert err.value.field == "n_heads"
    with pytest.raises(ShapeError) as err:
        Architecture.parse("[A|W|A|W]", shape="tiny")
    assert err.value.field == "n_kv_heads"
    with pytest.raises(UserError, match="disagrees"):
        data = Architecture.parse("AF").to_dict()
        data["layers"] = ["A", "A"]
        Architecture.from_dict(data)
