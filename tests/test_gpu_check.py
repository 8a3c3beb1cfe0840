"""benchmarks/gpu_check.sh and gpu_check.py in --cpu-smoke mode: the JSON and Markdown they
write, with every section filled (or skipped with its reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hcomposer.model import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--cpu-smoke"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, json.loads((out / "gpu_check.json").read_text()), out


def test_script_reports_each_kernel_in_one_line(smoke):
    stdout, _, _ = smoke
    for dist in ("fla-core", "causal-conv1d", "mamba-ssm"):
        lines = [x for x in stdout.splitlines() if x.startswith(f"kernel {dist}: ")]
        assert len(lines) == 1, stdout[:2000]
        assert lines[0].split(": ", 1)[1].startswith(("already installed", "installed", "skipped"))


def test_smoke_json_sections(smoke):
    _, r, _ = smoke
    assert r["mode"] == "cpu-smoke" and r["device"] == "CPU"
    d = r["parity"]["D (gated delta rule)"]
    try:
        import fla  # noqa: F401

        has_fla = True
    except ImportError:
        has_fla = False
    if has_fla:  # our scan against fla's reference: the same numbers, up to fp32 rounding
        assert d["max_abs_out"] < 1e-4 and d["max_abs_state"] < 1e-4 and d["max_abs_grad"] < 1e-4
    else:
        assert "not installed" in d["skipped"]
    assert "CUDA only" in r["parity"]["S (SSD)"]["skipped"]
    assert [t["pattern"] for t in r["train"]] == ["(AF)*2", "DFAF"]
    for t in r["train"]:
        model = build_model(t["pattern"], shape="tiny", seed=0, device="meta")
        assert t["params"] == sum(p.numel() for p in model.parameters())
        assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1
    assert {(x["pattern"], x["context"]) for x in r["decode"]} == {
        (p, L) for p in r["decode_patterns"] for L in r["contexts"]
    }
    assert all(x["tokens_per_s"] > 0 for x in r["decode"])
    assert "skipped" in r["paper"]


def test_smoke_markdown_tables(smoke):
    _, r, out = smoke
    md = (out / "gpu_check.md").read_text()
    for pattern in r["decode_patterns"]:
        row = next(x for x in md.splitlines() if x.startswith(f"| `{pattern}` | ") and
                   x.count("|") == len(r["contexts"]) + 2)  # fmt: skip
        speeds = [float(c) for c in row.strip("|").split("|")[1:]]
        want = [x["tokens_per_s"] for L in r["contexts"] for x in r["decode"]
                if x["pattern"] == pattern and x["context"] == L]  # fmt: skip
        assert speeds == pytest.approx(want, abs=0.051)
    assert "| S (SSD) | skipped: mamba_ssm runs on CUDA only |" in md
    assert "## Shrunk paper run" in md
