"""The converted-against-from-scratch study: its analysis on known answers, and the figures of
benchmarks/results/convert_vs_scratch/ (result.json, README.md) recomputed from raw.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcomposer.io import read_jsonl
from load_script import script
from tagged_figures import assert_tagged_figures

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "results" / "convert_vs_scratch"
RAW = FOLDER / "raw.jsonl"


def _script():
    return script("benchmarks/convert_vs_scratch.py")


def test_crossing_interpolates_bounds_and_says_not_reached():
    cross = _script().crossing
    curve = [[10, 1.5], [20, 1.2], [30, 1.05]]
    assert cross(curve, 1.2) == (20, False)
    assert cross(curve, 1.1)[0] == pytest.approx(20 + 10 * 0.1 / 0.15)
    assert cross(curve, 1.6) == (10.0, True)  # already below at the first validation
    assert cross(curve, 1.0) == (None, False)


def _synthetic() -> list[dict]:
    def rec(arm, seed, curve, tokens, flops):
        return {"arm": arm, "seed": seed, "curve": curve, "final_val_loss": curve[-1][1],
                "tokens": tokens, "train_flops_per_token": flops}  # fmt: skip

    return [
        rec("teacher", 0, [[1000, 1.0]], 1000, 30),
        rec("converted", 0, [[10, 1.5], [20, 1.2], [30, 1.05]], 30, 40),
        rec("converted", 1, [[10, 1.15], [20, 1.1], [30, 1.08]], 30, 40),
        rec("scratch", 0, [[480, 1.2]], 480, 24),
        rec("scratch", 1, [[480, 1.1]], 480, 24),
    ]


def test_analyse_known_answers():
    got = _script().analyse(_synthetic())
    # Pairs (converted, scratch): tokens to reach the scratch run's final loss.
    needed = {(p["converted_seed"], p["scratch_seed"]): p["tokens_needed"] for p in got["pairs"]}
    assert needed == pytest.approx({(0, 0): 20, (0, 1): 20 + 20 / 3, (1, 0): 10, (1, 1): 20})
    assert [p["upper_bound"] for p in got["pairs"]] == [False, False, True, False]
    ratios = [480 / 20, 480 / (20 + 20 / 3), 48, 24]
    assert got["token_ratio"]["mean"] == pytest.approx(sum(ratios) / 4)
    assert (got["token_ratio"]["min"], got["token_ratio"]["max"]) == pytest.approx((18, 48))
    assert got["flop_ratio"]["min"] == pytest.approx(480 * 24 / ((20 + 20 / 3) * 40))
    first = got["flop_ratio_with_teacher_pretraining"]["max"]
    assert first == pytest.approx(480 * 24 / (10 * 40 + 1000 * 30))
    assert got["gap_to_teacher_pct"]["mean"] == pytest.approx(6.5)
    assert got["gap_to_teacher_pct"]["sd"] == pytest.approx(math.sqrt(2 * 1.5**2))
    assert got["pairs_reached"] == "4/4" and got["any_upper_bound"] is True
    assert got["goal_met"] is False  # 18x and more, but seed 1 ends 8% above the teacher
    # A scratch loss no converted run reaches: reported as not reached, not as a ratio.
    recs = _synthetic()
    recs[3] = {**recs[3], "final_val_loss": 0.9}
    got = _script().analyse(recs)
    assert got["pairs_reached"] == "2/4" and got["goal_met"] is False
    assert [p["tokens_needed"] for p in got["pairs"][:2]] == [None, pytest.approx(20 + 20 / 3)]


def test_analyse_the_other_way_round():
    """Tokens the from-scratch run needs to reach the converted model's final loss."""
    recs = _synthetic()[:2] + [
        {"arm": "scratch", "seed": 0, "curve": [[100, 1.4], [200, 1.25], [300, 1.15]],
         "final_val_loss": 1.15, "tokens": 300, "train_flops_per_token": 24},
    ]  # fmt: skip
    recs[1] = {**recs[1], "curve": [[10, 1.5], [30, 1.2]], "final_val_loss": 1.2}
    got = _script().analyse(recs)
    assert got["pairs_reached"] == "0/1" and got["token_ratio"] is None
    assert got["pairs"][0]["scratch_tokens_to_converted_final"] == pytest.approx(250)
    assert got["reverse_token_ratio"]["mean"] == pytest.approx(250 / 30)
    assert got["reverse_flop_ratio"]["mean"] == pytest.approx(250 * 24 / (30 * 40))
    assert got["reverse_pairs_reached"] == "1/1"


def _records() -> list[dict]:
    return list(read_jsonl(RAW))


def figures() -> dict[str, str]:
    """Every number the README states, by name, formatted as it is printed there."""
    r = _script().analyse(_records())
    out = _arm_figures(r, "")
    if "long" in r:
        out |= _arm_figures(r["long"], "long_")
    return out


def _arm_figures(r: dict, pre: str) -> dict[str, str]:
    out = {"conv_seeds": str(len(r["converted_seeds"])), "reached": r["pairs_reached"]}
    keys = ["converted_final"]
    if not pre:
        out["teacher"] = f"{r['teacher_val_loss']:.3f}"
        out["scratch_seeds"] = str(len(r["scratch_seeds"]))
        keys.append("scratch_final")
    for key in keys:
        out[key] = f"{r[key]['mean']:.3f}"
        out[key + "_sd"] = f"{r[key]['sd']:.3f}"
    for key in ("gap_to_teacher_pct", "scratch_gap_to_teacher_pct")[: 1 if pre else 2]:
        s = r[key]
        out[key] = f"{s['mean']:.1f}"
        out[key + "_range"] = f"{s['min']:.1f}-{s['max']:.1f}"
        out[key + "_ci"] = f"{s['ci95'][0]:.1f}-{s['ci95'][1]:.1f}"
    out["reverse_reached"] = r["reverse_pairs_reached"]
    keys = ("token_ratio", "flop_ratio", "flop_ratio_with_teacher_pretraining")
    for key in (*keys, "reverse_token_ratio", "reverse_flop_ratio"):
        s = r[key]
        if s is None:  # not reached: "reached" / "reverse_reached" say so
            continue
        digits = 2 if s["max"] < 1 else 1
        out[key] = f"{s['mean']:.{digits}f}"
        out[key + "_range"] = f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"
    return {pre + k: v for k, v in out.items()}


@pytest.mark.skipif(not RAW.is_file(), reason="the study's raw file is not there")
def test_result_json_is_the_analysis_of_the_raw_file():
    stored = json.loads((FOLDER / "result.json").read_text())
    _assert_close(stored, json.loads(json.dumps(_script().analyse(_records()))))


def _assert_close(a, b, where="result"):
    """Equal JSON documents, floats to 1e-9 (a recomputation may round differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) or math.isnan(b)):
        assert a == pytest.approx(b, rel=1e-9), where
    else:
        assert a == b or (a != a and b != b), where


@pytest.mark.skipif(not RAW.is_file(), reason="the study's raw file is not there")
def test_readme_states_the_raw_files_figures():
    assert_tagged_figures(FOLDER / "README.md", figures(), strip="`*(),;:x%")
