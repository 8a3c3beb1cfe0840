"""Every kind of plot is drawn through matplotlib's object API: in a fresh process, making all
of them leaves the user's backend as it was and never imports pyplot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hcomposer

# Makes one of every plot the package draws into sys.argv[1], on a session whose backend was
# set to "svg" beforehand (as a notebook sets its own), then reports what it finds.
_SCRIPT = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("svg")
before = matplotlib.get_backend()

from hcomposer.evaluation.efficiency import plot_efficiency
from hcomposer.evaluation.mqar_curve import plot_mqar_curve
from hcomposer.evaluation.niah import plot_niah
from hcomposer.proxies.rank_correlation import plot_proxy_rank
from hcomposer.reporting.report import (
    plot_loss_curves, plot_pareto, plot_pattern_strips, plot_trials,
)
from hcomposer.scaling.plots import plot_frontier, plot_isoflop
from hcomposer.search.tabular_report import plot_regret

out = Path(sys.argv[1])
imported = {"after imports": "matplotlib.pyplot" in sys.modules}
trials = [
    {"number": i, "score": s, "state": "COMPLETE", "cost": c}
    for i, (s, c) in enumerate([(0.2, 3.0), (0.5, 2.0), (0.4, 1.0)])
]
plot_trials(trials, out / "trials.png")
plot_pareto(trials, out / "pareto.png")
plot_pattern_strips([("a", "AFAF"), ("b", "[A|S]FSF")], out / "strips.png")
plot_loss_curves(
    {"a": [{"tokens": 10, "loss": 3.0}, {"tokens": 20, "loss": 2.5, "val_loss": 2.6}]},
    out / "loss.png",
)
inference = [
    {"context": n, "prefill_tokens_per_s": 100.0 / n, "decode_tokens_per_s": 10.0,
     "kv_bytes": 1024 * n, "state_bytes": 0}
    for n in (64, 128)
]
plot_efficiency({"AF": {"inference": inference}}, out / "efficiency.png")
plot_mqar_curve(
    {"AF": {"points": [{"length": 64, "accuracy": 1.0}, {"length": 128, "accuracy": 0.5}]}},
    out / "mqar.png",
)
plot_niah(
    {"lengths": [64, 128], "depths": [0.0, 0.5], "train_len": 64,
     "accuracy": {"64": {"0": 1.0, "0.5": 1.0}, "128": {"0": 0.5, "0.5": 0.0}}},
    out / "niah.png",
)
plot_proxy_rank(
    [{"pattern": "AF", "proxy_score": 0.9, "scale_val_loss": 2.0, "scale_std": 0.1},
     {"pattern": "FF", "proxy_score": 0.1, "scale_val_loss": 3.0}],
    {"spearman": 1.0, "kendall": 1.0, "spearman_ci": [0.5, 1.0]},
    out / "proxy_rank.png",
    "mad",
)
replay = SimpleNamespace(regret=[0.3, 0.1, 0.0], evals_to_tied=3)
plot_regret({"random": [replay, replay]}, SimpleNamespace(name="toy"), 3, out / "regret.png")
fit = {
    "budget": 1e15, "ok": True, "inside": True, "n_opt": 2e6, "loss_opt": 2.9,
    "parabola": {"a": 0.1, "b": -2.9, "c": 24.0},
}
iso = {
    "runs": [
        {"pattern": "AF", "budget": 1e15, "params": n, "loss": l}
        for n, l in ((1e6, 3.0), (2e6, 2.9), (4e6, 3.05))
    ],
    "patterns": {"AF": {"budgets": [fit], "n_exponent": None, "loss_slope": None}},
}
plot_isoflop(iso, out / "isoflop.png")
frontier = {"patterns": {"AF": {
    "budgets": [fit, {**fit, "budget": 1e16, "n_opt": 6e6, "loss_opt": 2.7}],
    "n_exponent": {"slope": 0.5, "intercept": -2.8},
    "loss_slope": {"slope": -0.2, "intercept": 5.9},
}}}
plot_frontier(frontier, out / "frontier.png")
imported["after plots"] = "matplotlib.pyplot" in sys.modules
print(json.dumps({"before": before, "after": matplotlib.get_backend(), "pyplot": imported}))
"""

_PLOTS = [
    "trials",
    "pareto",
    "strips",
    "loss",
    "efficiency",
    "mqar",
    "niah",
    "proxy_rank",
    "regret",
    "isoflop",
    "frontier",
]


def test_plots_leave_the_backend_alone_and_never_import_pyplot(tmp_path):
    src = str(Path(hcomposer.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("MPLBACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == got["after"] == "svg"
    assert got["pyplot"] == {"after imports": False, "after plots": False}
    for name in _PLOTS:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
    assert sorted(p.stem for p in tmp_path.iterdir()) == sorted(_PLOTS)
