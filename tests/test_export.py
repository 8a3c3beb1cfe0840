"""Hugging Face export: native Llama for (AF)*n, HComposerForCausalLM for everything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from byte_tok import ByteTok
from hcomposer import Architecture
from hcomposer.errors import UserError
from hcomposer.export import export_model, is_llama_pattern
from hcomposer.model import build_model

transformers = pytest.importorskip("transformers")


def _arch(pattern: str, tie: bool = True) -> Architecture:
    shape = Architecture.parse("AF", "tiny").shape.replace(vocab_size=260, tie_embeddings=tie)
    return Architecture.parse(pattern, shape)


def _export(tmp_path, pattern, tie=True, name="hf"):
    arch = _arch(pattern, tie)
    model = build_model(arch, seed=1).eval()
    # Perturb the norms so that a weight silently left at its init would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    summary = export_model(model, arch, ByteTok(), tmp_path / name)
    return model, summary


def test_llama_pattern_detection():
    assert is_llama_pattern(_arch("AFAF"))
    assert not is_llama_pattern(_arch("AFFA"))
    assert not is_llama_pattern(_arch("AFAFW"))
    assert not is_llama_pattern(_arch("[A|W]F"))


@pytest.mark.parametrize("tie", [True, False])
def test_llama_export_reproduces_logits_and_generate(tmp_path, tie):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model, summary = _export(tmp_path, "AFAF", tie)
    assert summary["kind"] == "llama"
    path = tmp_path / "hf"
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    assert not (path / "modeling_hcomposer.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 260, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    ours = model.generate(x[:, :7], 12)
    theirs = hf.generate(x[:, :7], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)
    if not tie:
        assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(path)
    text = "needle: 1234567 héllo 😀\n"
    assert tok(text).input_ids == ByteTok().encode(text)
    assert tok.decode(ByteTok().encode(text)) == text
    assert tok.eos_token_id == 256


def test_hcomposer_export_logits_generate_and_cache_growth(tmp_path):
    from transformers import AutoModelForCausalLM

    import hcomposer.hf  # noqa: F401  (registers model_type "hcomposer")

    model, summary = _export(tmp_path, "AF[A|S]FWE", tie=False)
    assert summary["kind"] == "hcomposer"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "HComposerForCausalLM"
    x = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
        # Labels give the shifted next-token loss, equal to ours.
        loss = hf(x, labels=x).loss
        torch.testing.assert_close(loss, model.loss(x[:, :-1], x[:, 1:]), atol=1e-5, rtol=0)
    ours = model.generate(x[:, :5], 12)
    cached = hf.generate(x[:, :5], max_new_tokens=12, do_sample=False, eos_token_id=None)
    uncached = hf.generate(
        x[:, :5], max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=False
    )
    assert torch.equal(ours, cached)
    assert torch.equal(ours, uncached)
    # Prefill 5 tokens (cache sized 5 + 64), decode in pieces to 40, then 35 more: the
    # global KV caches must grow, and the pieces must still equal one full forward.
    with torch.no_grad():
        full = model(x)
        out = hf(x[:, :5], use_cache=True)
        pieces = [out.logits]
        for a, b in ((5, 8), (8, 10), (10, 40)):
            out = hf(x[:, a:b], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
        assert out.past_key_values.get_seq_length() == 40
        x2 = torch.cat([x, x], dim=1)[:, :75]
        out = hf(x2[:, 40:], past_key_values=out.past_key_values, use_cache=True)
        assert out.past_key_values.inner.max_len >= 75
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits, model(x2)[:, 40:], atol=1e-4, rtol=0)


def test_remote_code_loads_without_registration(tmp_path):
    model, _ = _export(tmp_path, "AWFA", tie=True)
    x = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.save({"x": x, "logits": model(x).detach()}, tmp_path / "ref.pt")
    # A fresh interpreter that never imports hcomposer.hf itself: only auto_map finds the code.
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r}, trust_remote_code=True)
        with torch.no_grad():
            torch.testing.assert_close(hf(ref["x"]).logits, ref["logits"], atol=1e-4, rtol=0)
        out = hf.generate(ref["x"], max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert out.shape == (1, 19)
        print("remote-ok", type(hf).__module__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "remote-ok" in res.stdout


def test_export_target_exists_is_left_untouched(tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    arch = _arch("AF")
    with pytest.raises(UserError, match="already exists"):
        export_model(build_model(arch, seed=0), arch, ByteTok(), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


def test_export_config_fields(tmp_path):
    _export(tmp_path, "AFAFAF", tie=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    shape = _arch("AF").shape
    assert cfg["num_hidden_layers"] == 3
    assert cfg["num_key_value_heads"] == shape.n_kv_heads
    assert cfg["head_dim"] == shape.head_dim
    assert cfg["tie_word_embeddings"] is True
    arch = Architecture.from_json(tmp_path / "hf" / "hcomposer_architecture.json")
    assert arch.pattern == "AFAFAF"


def test_import_hcomposer_alone_registers_auto_classes(tmp_path):
    """`import hcomposer` (not hcomposer.hf) is enough for AutoModelForCausalLM, no remote code."""
    model, _ = _export(tmp_path, "AF[A|S]F", tie=True)
    x = torch.randint(0, 260, (1, 12), generator=torch.Generator().manual_seed(5))
    torch.save({"x": x, "logits": model(x).detach()}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        import hcomposer
        assert "transformers" not in sys.modules  # the import itself stays light
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r})
        with torch.no_grad():
            torch.testing.assert_close(hf(ref["x"]).logits, ref["logits"], atol=1e-4, rtol=0)
        print("auto-ok", type(hf).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "auto-ok hcomposer.hf.modeling_hcomposer" in res.stdout


@pytest.mark.parametrize("pattern", ["DFD[A|D]F", "F[D|S]FAF"])
def test_hcomposer_export_with_gated_deltanet(tmp_path, pattern):
    from transformers import AutoModelForCausalLM

    import hcomposer.hf  # noqa: F401  (registers model_type "hcomposer")

    model, summary = _export(tmp_path, pattern, tie=False)
    assert summary["kind"] == "hcomposer"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.arch.pattern == pattern
    # Every D weight (A_log, dt_bias, the norm scale too) came through unchanged.
    theirs = hf.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(theirs[name], p), name
    x = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    ours = model.generate(x[:, :5], 12)
    cached = hf.generate(x[:, :5], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, cached)
