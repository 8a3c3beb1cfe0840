"""Hub-ready export: native Bamba, self-contained remote code, model card, permissions."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from byte_tok import ByteTok
from hcomposer import Architecture
from hcomposer.errors import UserError
from hcomposer.export import export_model, resolve_kind
from hcomposer.export.remote import module_source, remote_code_files, shipped_modules
from hcomposer.model import build_model

transformers = pytest.importorskip("transformers")


def _arch(pattern: str, tie: bool = True, groups: int = 1) -> Architecture:
    shape = Architecture.parse("AF", "tiny").shape.replace(
        vocab_size=260, tie_embeddings=tie, ssm_groups=groups
    )
    return Architecture.parse(pattern, shape)


def _model(arch: Architecture, seed: int = 1):
    model = build_model(arch, seed=seed).eval()
    # Perturb norms, D and the MoE bias: a weight left at its init would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".D"):
                p.add_(0.1 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.add_(0.05 * torch.randn_like(b))
    return model


@pytest.mark.parametrize(
    "pattern, kind",
    [
        ("AFAF", "llama"),
        ("SFAF", "bamba"),
        ("SFSF", "bamba"),
        ("AFSFAF", "bamba"),
        ("SFFS", "hcomposer"),  # not alternating
        ("SEAF", "hcomposer"),  # MoE
        ("WFSF", "hcomposer"),  # sliding window
        ("[A|S]FSF", "hcomposer"),  # parallel group
        ("SF[A|S]F", "hcomposer"),
    ],
)
def test_auto_kind(pattern, kind):
    assert resolve_kind(_arch(pattern), "auto") == kind


def test_explicit_kind_that_does_not_fit_is_refused():
    with pytest.raises(UserError, match="bamba does not fit"):
        resolve_kind(_arch("SEAF"), "bamba")
    with pytest.raises(UserError, match="llama does not fit"):
        resolve_kind(_arch("SFAF"), "llama")


@pytest.mark.parametrize("tie, groups", [(False, 2), (True, 1)])
def test_bamba_export_reproduces_logits_and_generate(tmp_path, tie, groups):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = _arch("SFAFSF", tie=tie, groups=groups)
    model = _model(arch)
    summary = export_model(model, arch, ByteTok(), tmp_path / "hf")
    assert summary["kind"] == "bamba" and summary["model_class"] == "BambaForCausalLM"
    path = tmp_path / "hf"
    assert AutoConfig.from_pretrained(path).model_type == "bamba"
    assert not list(path.glob("*.py"))  # no remote code
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == "BambaForCausalLM"
    # 45 tokens: more than two SSM chunks of 16, with a ragged last chunk.
    x = torch.randint(0, 260, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    ours = model.generate(x[:, :6], 12)
    theirs = hf.generate(x[:, :6], max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)


def _strip_imports(text: str) -> list[str]:
    """Lines other than hcomposer imports (absolute or rewritten) and the registry's import."""
    out, skipping = [], False
    for line in text.splitlines():
        if skipping:
            skipping = line.strip() != ")"
            continue
        if re.match(r"\s*from (hcomposer[\w.]*|\.\w+) import ", line):
            skipping = line.rstrip().endswith("(")
            continue
        out.append(re.sub(r"importlib\.import_module\(.*\)", "IMPORT", line))
    return out


def test_remote_code_is_the_package_source_with_imports_rewritten():
    files = remote_code_files()
    assert {"modeling_hcomposer.py", "configuration_hcomposer.py"} <= set(files)
    modules = shipped_modules()
    assert set(modules) == set(files)
    for name, text in files.items():
        original = module_source(modules[name])
        shipped = _strip_imports(text)
        assert shipped[: len(_strip_imports(original))] == _strip_imports(original), name
        assert "import hcomposer" not in text and "from hcomposer" not in text


def _bare_venv(tmp_path: Path) -> Path:
    """A venv that sees torch and transformers but not hcomposer (nor its editable install)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = {str(Path(m.__file__).resolve().parents[1]) for m in (torch, transformers)}
    # A path added by a .pth line does not get its own .pth files read, so the editable
    # install of hcomposer in that site-packages stays invisible.
    (site / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv / "bin" / "python"


def test_folders_load_in_an_environment_without_hcomposer(tmp_path):
    arch = _arch("AF[A|S]FSEWF", tie=False, groups=2)
    model = _model(arch)
    export_model(model, arch, ByteTok(), tmp_path / "hybrid")
    barch = _arch("SFAF")
    bmodel = _model(barch, seed=2)
    export_model(bmodel, barch, ByteTok(), tmp_path / "bamba")
    x = torch.randint(0, 260, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = {
            "x": x,
            "hybrid": model(x),
            "bamba": bmodel(x),
            "gen": model.generate(x[:, :5], 10),
        }
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.items()}, tmp_path / "ref.safetensors")
    python = _bare_venv(tmp_path)
    script = textwrap.dedent(
        f"""
        import importlib.util
        assert importlib.util.find_spec("hcomposer") is None, "hcomposer is visible"
        try:
            import hcomposer  # noqa: F401
        except ModuleNotFoundError:
            print("no-hcomposer")
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hybrid")!r},
                                                  trust_remote_code=True).eval()
        bamba = AutoModelForCausalLM.from_pretrained({str(tmp_path / "bamba")!r}).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ref["x"]).logits, ref["hybrid"], atol=1e-4, rtol=0)
            torch.testing.assert_close(bamba(ref["x"]).logits, ref["bamba"], atol=1e-4, rtol=0)
        out = hf.generate(ref["x"][:, :5], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert torch.equal(out, ref["gen"])
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "hybrid")!r})
        assert tok("héllo").input_ids == list("héllo".encode())
        print("loaded", type(hf).__module__, type(bamba).__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [str(python), "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "no-hcomposer" in res.stdout
    assert "loaded transformers_modules." in res.stdout and "BambaForCausalLM" in res.stdout


def test_model_card_parses_and_says_what_it_should(tmp_path):
    ModelCard = pytest.importorskip("huggingface_hub").ModelCard

    arch = _arch("SFAF")
    info = {
        "step": 12,
        "tokens": 6144,
        "config": {
            "train": {"data": "corpus.jsonl", "tokenizer": "byte", "seq_len": 64, "seed": 3},
            "dataset": {"source": {"spec": "corpus.jsonl"}, "tokens": {"train": 900, "val": 50}},
        },
        "summary": {"val_loss": 2.5, "loss": 2.75},
    }
    evals = "# Evaluation\n\n## loss\n\n| metric | value |\n|---|---|\n| val_loss | 2.5 |\n"
    export_model(_model(arch), arch, ByteTok(), tmp_path / "hf", run_info=info, eval_markdown=evals)
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert "hcomposer" in card.data.tags and "mamba2" in card.data.tags
    text = card.text
    n_params = sum(p.numel() for p in _model(arch).parameters())
    wants = ["`SFAF`", "BambaForCausalLM", f"{n_params:,} total", "corpus.jsonl", "6,144"]
    wants += ["| val_loss | 2.5 |", "from_pretrained", "| `d_model` | 64 |", "seq_len=64"]
    wants += ["900 training", "\n### loss\n"]
    for want in wants:
        assert want in text, want
    # Without run information or results the card says so instead of inventing them.
    hybrid = _arch("SEAF")
    export_model(_model(hybrid), hybrid, ByteTok(), tmp_path / "hf2")
    card2 = ModelCard.load(tmp_path / "hf2" / "README.md")
    assert card2.data.to_dict().get("custom_code") is True
    assert "No stored results" in card2.text and "Not recorded" in card2.text
    assert "trust_remote_code=True" in card2.text


def test_exported_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        arch = _arch("SEAF")
        export_model(_model(arch), arch, ByteTok(), tmp_path / "hf")
    finally:
        os.umask(old)
    root = tmp_path / "hf"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
    assert json.loads((root / "config.json").read_text())["model_type"] == "hcomposer"
