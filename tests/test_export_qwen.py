"""The attention options of Qwen teachers (q/k/v biases, per-head q/k norms) through export:
native Qwen2/Qwen3 classes for (AF)*n, the self-contained class otherwise, logits equal to
ours after loading back; a converted Qwen student exports and loads back the same way."""

from __future__ import annotations

import pytest
import torch

from byte_tok import ByteTok
from hcomposer import Architecture
from hcomposer.convert import load_teacher
from hcomposer.convert.mapping import convert_model, student_architecture
from hcomposer.errors import UserError
from hcomposer.export import export_model, resolve_kind
from hcomposer.model import build_model

transformers = pytest.importorskip("transformers")


def _arch(pattern: str, **options) -> Architecture:
    shape = Architecture.parse("AF", "tiny").shape.replace(vocab_size=260, **options)
    return Architecture.parse(pattern, shape)


def _randomise_options(model) -> None:
    """Biases start at 0 and norm scales at 1: draw them so that a dropped one shows."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


def _load_back(path, model):
    """The exported folder through AutoModelForCausalLM: our logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    import hcomposer.hf  # noqa: F401  (registers model_type "hcomposer")

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    vocab = model.arch.shape.vocab_size
    x = torch.randint(0, vocab, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    ours = model.generate(x[:, :5], 8)
    theirs = hf.generate(x[:, :5], max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)
    return hf


@pytest.mark.parametrize(
    ("pattern", "options", "kind", "cls"),
    [
        ("AFAF", {"attn_bias": True}, "qwen2", "Qwen2ForCausalLM"),
        ("AFAF", {"qk_norm": True}, "qwen3", "Qwen3ForCausalLM"),
        ("AFAF", {"attn_bias": True, "qk_norm": True}, "hcomposer", "HComposerForCausalLM"),
        ("AFDFWF", {"qk_norm": True}, "hcomposer", "HComposerForCausalLM"),
    ],
)
def test_options_export_and_load_back(tmp_path, pattern, options, kind, cls):
    arch = _arch(pattern, **options)
    model = build_model(arch, seed=2).eval()
    _randomise_options(model)
    summary = export_model(model, arch, ByteTok(), tmp_path / "hf")
    assert summary["kind"] == kind
    hf = _load_back(tmp_path / "hf", model)
    assert type(hf).__name__ == cls
    assert hf.num_parameters() == sum(p.numel() for p in model.parameters())


def test_kinds_that_do_not_hold_the_options_are_refused():
    qwen2 = _arch("AFAF", attn_bias=True)
    assert resolve_kind(qwen2, "hcomposer") == "hcomposer"
    for kind in ("llama", "qwen3", "bamba"):
        with pytest.raises(UserError, match=f"--kind {kind} does not fit attention with attn_bias"):
            resolve_kind(qwen2, kind)
    with pytest.raises(UserError, match="--kind qwen2 does not fit plain attention"):
        resolve_kind(_arch("AFAF"), "qwen2")
    # A Bamba-shaped pattern with an option goes to the self-contained class.
    assert resolve_kind(_arch("AFSF", qk_norm=True), "auto") == "hcomposer"
    assert resolve_kind(_arch("AFSF"), "auto") == "bamba"


def _qwen_teacher(tmp_path, cls: str):
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = getattr(transformers, f"{cls}ForCausalLM")(config)
    _randomise_options(hf)
    hf.save_pretrained(tmp_path / cls)
    return load_teacher(tmp_path / cls)


@pytest.mark.parametrize("cls", ["Qwen2", "Qwen3"])
def test_converted_qwen_student_keeps_the_options_and_exports(tmp_path, cls):
    teacher = _qwen_teacher(tmp_path, cls)
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(4))
    # W over a window longer than the text is the teacher's attention exactly (options too).
    arch_w = student_architecture(teacher.arch, [0, 4], "W")
    student_w, _ = convert_model(teacher.model, arch_w.with_shape(arch_w.shape.replace(window=64)))
    with torch.no_grad():
        torch.testing.assert_close(student_w(tokens), teacher.model(tokens), atol=1e-5, rtol=0)
    # D: the kept attention keeps its biases / norms; the converted one says what it dropped.
    student, reports = convert_model(teacher.model, student_architecture(teacher.arch, [2], "D"))
    kept = dict(student.layers[0].mixer.named_parameters())
    for name, p in teacher.model.layers[0].mixer.named_parameters():
        assert torch.equal(kept[name], p), name
    assert any("not carried" in v for v in reports[2].values())
    student.eval()
    export_model(student, student.arch, ByteTok(), tmp_path / "hf")
    _load_back(tmp_path / "hf", student)
