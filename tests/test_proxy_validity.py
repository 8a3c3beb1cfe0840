"""The proxy-validity figures every run report states (``hcomposer/assets/proxy_validity.json``)
recomputed from the raw files of the study they come from."""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import pytest

from hcomposer.io import read_jsonl
from hcomposer.proxies.rank_correlation import study_scale_losses
from hcomposer.proxies.zoo import letters
from hcomposer.stats import spearman_ci

ROOT = Path(__file__).resolve().parents[1]
ASSET = json.loads(resources.files("hcomposer").joinpath("assets/proxy_validity.json").read_text())


def _recompute(folder: Path) -> dict:
    res = json.loads((folder / "result.json").read_text())
    # The six-task figure in the study's own report order (the bootstrap resamples
    # positions, so the interval depends on the order); the others over sorted patterns,
    # as benchmarks/proxy_task_subsets_against_scale.py and RESULTS.md compute them.
    report_order = [p["pattern"] for p in res["points"] if p["scale_val_loss"] is not None]
    losses = study_scale_losses(folder)
    by: dict[str, list[dict]] = {}
    for r in read_jsonl(folder / "proxy_scores.jsonl"):
        by.setdefault(r["pattern"], []).append(r)
    pats = sorted(losses)

    def fig(score, order):
        rho, lo, hi = spearman_ci([score(p) for p in order], [-losses[p] for p in order])
        return {"spearman": round(rho, 2), "ci": [round(lo, 2), round(hi, 2)]}

    def tasks(names):
        return lambda p: statistics.fmean(
            statistics.fmean(r["tasks"][t]["accuracy"] for t in names) for r in by[p]
        )

    quick = "mad:in_context_recall,selective_copying,memorization"
    return {
        "n": len(pats),
        "mad": fig(lambda p: statistics.fmean(r["score"] for r in by[p]), report_order),
        quick: fig(tasks(["in_context_recall", "selective_copying", "memorization"]), pats),
        "mad:fuzzy_in_context_recall": fig(tasks(["fuzzy_in_context_recall"]), pats),
        "has S/D": fig(lambda p: float(any(c in "SD" for c in letters(p))), pats),
        "count of S+D": fig(lambda p: float(sum(c in "SD" for c in letters(p))), pats),
        "count of A": fig(lambda p: float(letters(p).count("A")), pats),
    }


@pytest.mark.skipif(not (ROOT / ASSET["study"]).is_dir(), reason="the study's raw files")
def test_every_validity_figure_comes_from_the_raw_files():
    got = _recompute(ROOT / ASSET["study"])
    assert ASSET["n"] == got["n"]
    for key, entry in ASSET["proxies"].items():
        assert {k: entry[k] for k in ("spearman", "ci")} == got[key], key
    for key, entry in ASSET["trivial"].items():
        assert entry == got[key], key


def test_the_report_states_validity_and_free_rankings():
    from hcomposer.pipeline.report import validity_lines

    done = [{"pattern": "SSFFAA", "score": 0.8}, {"pattern": "AFSFFF", "score": 0.75},
            {"pattern": "AFAFAF", "score": 0.7}, {"pattern": "FFFFFF", "score": 0.1}]  # fmt: skip
    quick = ASSET["proxies"]["mad:in_context_recall,selective_copying,memorization"]
    text = "\n".join(validity_lines("mad:recall,copy,memorize", "proxy", done))
    lo, hi = quick["ci"]
    assert f"{quick['spearman']:.2f} [{lo:.2f}, {hi:.2f}]" in text
    assert "A one-line rule ranked those patterns better" in text  # its interval lies below
    # Free rankings: SSFFAA is first by proxy and by has-S/D; AFAFAF first by count of A.
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in text.splitlines() if r.startswith("| `")}  # fmt: skip
    assert rows["`SSFFAA`"][0] == "1" and rows["`SSFFAA`"][2] == "1"
    assert rows["`AFAFAF`"][4] == "1" and rows["`FFFFFF`"][0] == "4"
    assert "has not been measured" in "\n".join(validity_lines("mqar", "proxy", done))
