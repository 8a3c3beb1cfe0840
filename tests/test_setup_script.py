"""scripts/setup.sh installs through pip's own configuration: it names no package index, and
without a GPU it never falls back to PyPI's default (CUDA) torch build."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"


def test_setup_names_no_index_address():
    text = SETUP.read_text()
    assert not re.search(r"https?://", text), "setup.sh must not carry an index address"
    assert "--index-url https" not in text


def test_setup_stops_with_one_line_when_no_cpu_build(tmp_path):
    """A fake python whose pip finds nothing and whose torch does not import: no GPU, no CPU
    build reachable -> exit 2 and one line naming TORCH_INDEX_URL, nothing installed."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1" = "-c" ]; then exit 1; fi\n'  # torch does not import
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 1; fi\n'  # pip finds nothing
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "TORCH_SPEC")}
    env["PYTHON"] = str(fake)
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"  # no nvidia-smi
    res = subprocess.run(
        ["bash", str(SETUP), "--here"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "TORCH_INDEX_URL" in err[0]
    pip_calls = [c for c in calls.read_text().splitlines() if c.startswith("-m pip")]
    # One try of the CPU build through pip's configured index; never a plain (CUDA) torch.
    assert len(pip_calls) == 1 and "+cpu" in pip_calls[0]
