"""``hcomposer dashboard``: optuna-dashboard on a loopback port serves a search's study.

The API must list the study under the search's own name, every trial of it, and on each
trial the attributes a reader needs (pattern, role, costs, scores, failure reasons).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from hcomposer.cli import main
from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.results import study_name

pytest.importorskip("optuna_dashboard", reason="pip install 'hcomposer[dashboard]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_dashboard_lists_the_study_and_its_trials(tmp_path):
    out = tmp_path / "run"
    # Eight patterns, a parameter limit that rules some out: trained and infeasible trials.
    config = SearchConfig(
        primitives="AF",
        layers=3,
        trials=3,
        sampler="random",
        shape="tiny",
        proxy="synthetic",
        max_params=70_000,
    )
    run_search(config, out, progress=False)
    trials = load_trials(out)
    port = _free_port()
    cmd = [sys.executable, "-m", "hcomposer.cli", "dashboard", str(out), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.time() < deadline, "the dashboard never answered"
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == [study_name(config, 0)]
        study = _get(f"{base}/api/studies/{studies[0]['study_id']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    served = {t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]} for t in study["trials"]}
    assert sorted(served) == [t["number"] for t in trials]
    roles = set()
    for t in trials:
        attrs = served[t["number"]]
        assert attrs["pattern"] == t["pattern"]
        assert json.loads(attrs["cost"])["params_total"] == t["cost"]["params_total"]
        roles.add(attrs["role"])
        if t["state"] == "COMPLETE":
            assert json.loads(attrs["scores"])["score"] == pytest.approx(t["score"])
        if t["state"] == "INFEASIBLE":
            assert attrs["failure"] == t["failure"] and "max-params" in t["failure"]
    assert {"evaluation", "infeasible"} <= roles


def test_dashboard_bad_input(tmp_path, capsys):
    assert main(["dashboard"]) == 2
    assert main(["dashboard", str(tmp_path)]) == 2  # not a search folder
    assert main(["dashboard", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "search folder" in err and "--port" in err
