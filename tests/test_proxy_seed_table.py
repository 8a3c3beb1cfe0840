"""benchmarks/proxy_seed_table.py: the calibration targets checked on a hand-made proxy log."""

import json
from pathlib import Path

import pytest

from load_script import script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "proxy_seed_table.py"


@pytest.fixture(scope="module")
def table():
    return script(SCRIPT)


TASKS = ("in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
         "selective_copying", "compression", "memorization")  # fmt: skip


def _row(pattern, seed, accs, restarts=0):
    tasks = {
        t: {"accuracy": a, "grid": [{"restart": i} for i in range(restarts + 1)]}
        for t, a in zip(TASKS, accs)
    }
    return {"pattern": pattern, "seed": seed, "score": sum(accs) / 6, "tasks": tasks,
            "wall_seconds": 10.0 + seed}  # fmt: skip


def test_targets_known_answers(table, tmp_path, capsys):
    rows = [
        # attention: recall solved, fuzzy only 0.25 above MLP-only, the rest well above
        *(_row("AFAFAF", s, [0.99, 0.39, 1.0, 0.45, 0.15, 0.1]) for s in (0, 1, 2)),
        *(_row("FFFFFF", s, [0.12, 0.14, 0.12, 0.07, 0.07, 1.0], restarts=2) for s in (0, 1, 2)),
        *(_row("SFSFSF", s, [1.0, 0.5, 1.0, 0.3, 0.15, 0.6 + 0.03 * s]) for s in (0, 1, 2)),
        *(_row("AAAAAA", s, [1.0, 0.37, 1.0, 0.5, 0.16, 0.01]) for s in (0, 1, 2)),
    ]
    log = tmp_path / "proxy_scores.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert table.main([str(log)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(" | ")[0]: ln for ln in out.splitlines() if ln.startswith("| ")}
    assert lines[
        "| recall: `AFAFAF` >= 0.9, `FFFFFF` <= chance + 0.1, `SFSFSF` >= 0.5 (seed means)"
    ].endswith("| yes |")
    fuzzy = lines["| fuzzy: `AFAFAF` - `FFFFFF` >= 0.3 (by seed)"]
    assert "0.25/0.25/0.25" in fuzzy and fuzzy.endswith("| no |")
    assert lines["| copy: `AFAFAF` - `FFFFFF` >= 0.3 (by seed)"].endswith("| yes |")
    assert lines["| memorisation: `FFFFFF` - `AAAAAA` >= 0.2 (by seed)"].endswith("| yes |")
    # SFSFSF's score moves by 0.005 per seed: sample std 0.005
    assert "| seed std of `SFSFSF`'s score <= 0.02 | 0.0050 | yes |" in out
    # FFFFFF took two restarts on each of its six tasks, on each of three seeds
    assert lines["| `FFFFFF`"].split(" | ")[-2:] == ["36", "10-12 |"]
    # a missing log is a clear error
    assert table.main([str(tmp_path / "none.jsonl")]) == 2
