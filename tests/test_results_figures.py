"""Every headline figure of README.md and benchmarks/RESULTS.md, recomputed from its raw file.

``benchmarks/RESULTS.md`` is one table, a row per figure: an id (an anchor), what was
measured, the figure, links to the raw files under ``benchmarks/results/`` it comes from,
the command that made them, and the date. ``FIGURES`` holds, for each id, those raw files
and a recipe that recomputes the figure's numbers from them: the row's figure cell must be
exactly the recipe's text, its links exactly the recipe's files, and its date the day the
last of those files was first committed. A row whose raw data was not kept says so and has
no recipe.

README.md quotes some figures in its prose. ``README_CLAIMS`` are the fragments it must
contain, filled with the same recipes' numbers, and every decimal number in a README
paragraph that links to RESULTS.md must sit inside one of them, or in a sentence that says
"raw data not kept", or in ``README_QUOTED`` (other people's numbers). So a number edited in
either file, a new unchecked number, or a raw file that no longer gives its number fails.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from hcomposer.io import read_jsonl
from hcomposer.proxies.rank_correlation import (
    rank_correlation,
    select_across_range,
    study_scale_losses,
)
from hcomposer.scaling.fits import fit_frontier
from hcomposer.search.tabular import Replay, load_table
from hcomposer.search.tabular_report import summarise
from hcomposer.stats import (
    noise_floor,
    pair_agreement,
    seed_std,
    spearman,
    spearman_ci,
    spearman_diff_ci,
    tied_with_best,
)
from load_script import script

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
RAW = ROOT / "benchmarks" / "results"
NOT_KEPT = "raw data not kept"
QUICK = ("in_context_recall", "selective_copying", "memorization")
FUZZY = "fuzzy_in_context_recall"
MIXERS = ("AFAFAF", "AAFFFF", "AAAAAA", "SFSFSF", "AFSAFS")
NAMED = ("AFAFAF", "AAFFFF", "FFFFFF", "SFSFSF", "AFSAFS")  # the calibration's five


def f2(x: float) -> str:
    return f"{x:.2f}"


def f3(x: float) -> str:
    return f"{x:.3f}"


def s2(x: float) -> str:
    return f"{x:+.2f}"


def ci(t, fmt=f2, lo_hi_fmt=None) -> dict[str, str]:
    """``(value, low, high)`` -> ``{"v", "lo", "hi"}`` formatted."""
    g = lo_hi_fmt or fmt
    return {"v": fmt(t[0]), "lo": g(t[1]), "hi": g(t[2])}


def prefixed(prefix: str, values: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}_{k}": v for k, v in values.items()}


# The proxy-to-scale study: its proxy log (every pattern, seed and task) and scale losses.


@cache
def _study():
    folder = RAW / "proxy_rank_cpu"
    by: dict[str, dict[int, dict]] = {}
    for r in read_jsonl(folder / "proxy_scores.jsonl"):
        by.setdefault(r["pattern"], {})[int(r["seed"])] = r
    scale: dict[str, list[float]] = {}
    for r in read_jsonl(folder / "scale_losses.jsonl"):
        if r.get("val_loss") is not None:
            scale.setdefault(r["pattern"], []).append(float(r["val_loss"]))
    return by, scale, study_scale_losses(folder)


def _scores(by, p: str) -> list[float]:
    return [by[p][s]["score"] for s in sorted(by[p])]


def _ordered(by, patterns) -> list[str]:
    """The patterns in the order the study's report lists them (``select_across_range`` of
    all): its bootstrap resamples positions, so the interval depends on that order."""
    scored = [(p, sum(_scores(by, p)) / len(by[p])) for p in patterns]
    return [p for p, _ in select_across_range(scored, len(scored))]


def _correlation(patterns) -> dict[str, float]:
    by, _, loss = _study()
    order = _ordered(by, patterns)
    return rank_correlation(
        [statistics.fmean(_scores(by, p)) for p in order], [loss[p] for p in order]
    )


def _heldout() -> list[str]:
    doc = json.loads((RAW / "proxy_rank_cpu" / "heldout_session8.json").read_text())
    return [pt["pattern"] for pt in doc["points"]]


@cache
def scale_rho() -> dict[str, str]:
    _, _, loss = _study()
    c = _correlation(sorted(loss))
    return {
        "rho": f2(c["spearman"]),
        "lo": f2(c["spearman_ci"][0]),
        "hi": f2(c["spearman_ci"][1]),
        "p": f3(c["spearman_p"]),
        "tau": f2(c["kendall"]),
        "n": str(c["n"]),
    }


@cache
def scale_heldout() -> dict[str, str]:
    held = _heldout()
    six = _correlation(held)
    return {
        "rho": scale_subsets()["held_fuzzy_v"],
        "lo": scale_subsets()["held_fuzzy_lo"],
        "hi": scale_subsets()["held_fuzzy_hi"],
        "n": str(len(held)),
        "six": f2(six["spearman"]),
        "six_lo": f2(six["spearman_ci"][0]),
        "six_hi": f2(six["spearman_ci"][1]),
    }


@cache
def scale_pairs() -> dict[str, str]:
    by, scale, _ = _study()
    a = pair_agreement({p: _scores(by, p) for p in scale}, scale)
    return {
        "agree": str(a["both_concordant"]),
        "both": str(a["both_separated"]),
        "pct": f"{100 * a['both_concordant'] / a['both_separated']:.0f}",
        "sep": str(a["proxy_separated"]),
        "pairs": str(a["pairs"]),
    }


def _subset_score(by, p: str, tasks) -> float:
    """benchmarks/proxy_task_subsets_against_scale.py's score: mean over the seeds of the
    mean accuracy over ``tasks``."""
    rows = [by[p][s]["tasks"] for s in sorted(by[p])]
    return statistics.fmean(statistics.fmean(r[t]["accuracy"] for t in tasks) for r in rows)


@cache
def scale_subsets() -> dict[str, str]:
    """Fuzzy recall alone and the quickstart's three tasks against scale; fuzzy recall on the
    held-out patterns is the held-out test itself (the mean accuracy over seeds, patterns
    sorted, as ``rank_correlation.task_correlations`` computes it)."""
    by, _, loss = _study()
    out = {}
    for group, pats in (("all", sorted(loss)), ("held", sorted(_heldout()))):
        neg = [-loss[p] for p in pats]
        fz = [_subset_score(by, p, (FUZZY,)) for p in pats]
        qk = [_subset_score(by, p, QUICK) for p in pats]
        out |= prefixed(f"{group}_fuzzy", ci(spearman_ci(fz, neg)))
        out |= prefixed(f"{group}_quick", ci(spearman_ci(qk, neg)))
        if group == "all":
            out |= prefixed("all_diff", ci(spearman_diff_ci(fz, qk, neg), s2))
    return out


@cache
def _variant(name: str):
    """A fuzzy-recall candidate scored on the study's patterns (seed 0), as
    benchmarks/proxy_variant_against_scale.py's report reads it: (candidate, the study's
    own fuzzy accuracy, minus the loss at scale), patterns sorted."""
    by, _, loss = _study()
    rows = {r["pattern"]: r for r in read_jsonl(RAW / "calibration" / f"{name}.jsonl")}
    assert {r["digest"] for r in rows.values()} == {next(iter(rows.values()))["digest"]}
    assert {r["seed"] for r in rows.values()} == {0}
    pats = sorted(p for p in loss if p in rows and 0 in by[p])
    base = [by[p][0]["tasks"][FUZZY]["accuracy"] for p in pats]
    return [rows[p]["score"] for p in pats], base, [-loss[p] for p in pats], rows


@cache
def fuzzy_long() -> dict[str, str]:
    cand, base, neg, _ = _variant("fuzzy_long_31")
    return (
        ci(spearman_ci(cand, neg))
        | {"base": f2(spearman(base, neg))}
        | prefixed("d", ci(spearman_diff_ci(cand, base, neg), s2))
    )


@cache
def fuzzy_mid() -> dict[str, str]:
    cand, _, neg, _ = _variant("fuzzy_b64s400_31")
    return ci(spearman_ci(cand, neg))


@cache
def fuzzy_control() -> dict[str, str]:
    ctrl, _, neg, _ = _variant("fuzzy_default_31")
    long, _, _, _ = _variant("fuzzy_long_31")
    mid, _, _, _ = _variant("fuzzy_b64s400_31")
    return (
        ci(spearman_ci(ctrl, neg))
        | prefixed("long", ci(spearman_diff_ci(long, ctrl, neg), s2))
        | prefixed("mid", ci(spearman_diff_ci(mid, ctrl, neg), s2))
    )


@cache
def fuzzy_cost() -> dict[str, str]:
    cpu = [r["cpu_s"] for r in _variant("fuzzy_default_31")[3].values()]
    return {
        "lo": f"{min(cpu):.0f}",
        "hi": f"{max(cpu):.0f}",
        "median": f"{statistics.median(cpu):.0f}",
    }


# Exhaustive tables, from the evaluation logs build_tabular.py writes (one line per pattern
# and seed; the last line of a (pattern, seed) wins, as the assembly reads them).


@cache
def _per_seed(*logs: str) -> dict[str, list[float]]:
    done: dict[tuple[str, int], float] = {}
    for log in logs:
        for r in read_jsonl(RAW / log):
            assert r["key"] in log, f"{log}: a line of another proxy config ({r['key']})"
            done[(r["pattern"], int(r["seed"]))] = r["score"]
    out: dict[str, dict[int, float]] = {}
    for (p, s), v in done.items():
        out.setdefault(p, {})[s] = v
    return {p: [v[s] for s in sorted(v)] for p, v in out.items()}


AF6Q_LOGS = (
    "search_af6q_r4/af6q-4c5ae13a44d6efd0-0of2.jsonl",
    "search_af6q_r4/af6q-4c5ae13a44d6efd0-1of2.jsonl",
)
AFS4Q_LOGS = (
    "search_afs4q/afs4q-dbf67ae1943653e1-0of2.jsonl",
    "search_afs4q/afs4q-dbf67ae1943653e1-1of2.jsonl",
)
AF6F_LOGS = (
    "search_af6f/work/af6f-ad2be956fe329a72-0of2.jsonl",
    "search_af6f/work/af6f-ad2be956fe329a72-1of2.jsonl",
)


def _ranked(per_seed) -> list[tuple[str, float]]:
    means = {p: statistics.fmean(v) for p, v in per_seed.items()}
    return sorted(means.items(), key=lambda kv: (-kv[1], kv[0]))


def _table(logs, size: int) -> dict[str, str]:
    per_seed = _per_seed(*logs)
    assert len(per_seed) == size, f"{logs}: {len(per_seed)} patterns, expected {size}"
    (best, top), *_ = _ranked(per_seed)
    tied, _ = tied_with_best(per_seed)
    pats = sorted(per_seed)
    n = min(len(v) for v in per_seed.values())
    seeds = [
        spearman([per_seed[p][i] for p in pats], [per_seed[p][j] for p in pats])
        for i in range(n)
        for j in range(i + 1, n)
    ]
    params = {r["pattern"]: r["params_total"] for log in logs for r in read_jsonl(RAW / log)}
    by_size = spearman([statistics.fmean(per_seed[p]) for p in pats], [params[p] for p in pats])
    return {
        "best": best,
        "score": f3(top),
        "floor": f3(noise_floor(per_seed)),
        "tied": str(len(tied)),
        "seed_lo": f2(min(seeds)),
        "seed_hi": f2(max(seeds)),
        "params": f2(by_size),
        "n": str(n),
    }


@cache
def af6q_table() -> dict[str, str]:
    return _table(AF6Q_LOGS, 64)


@cache
def afs4q_table() -> dict[str, str]:
    return _table(AFS4Q_LOGS, 81)


@cache
def picks_at_scale() -> dict[str, str]:
    """The pre-registered test (search_af6f/prereg.md): each table's top 3 at scale."""
    loss = study_scale_losses(RAW / "proxy_rank_cpu", RAW / "proxy_rank_cpu_picks")
    means = {}
    for name, logs in (("q", AF6Q_LOGS), ("f", AF6F_LOGS)):
        top = [p for p, _ in _ranked(_per_seed(*logs))[:3]]
        means[name] = statistics.fmean(loss[p] for p in top)
    return {"f": f3(means["f"]), "q": f3(means["q"]), "d": f"{means['f'] - means['q']:+.3f}"}


@cache
def _replays(path: str):
    doc = json.loads((RAW / path).read_text())
    reps = {k: [Replay.from_dict(r) for r in v] for k, v in doc["replays"].items()}
    return summarise(reps, doc["budget"])


def _hits(t) -> dict[str, str]:
    return {"v": f"{t[0]:+g}", "lo": f"{t[1]:+g}", "hi": f"{t[2]:+g}"}


def _median_ci(s) -> str:
    lo, hi = s["evals_to_tied_ci"]
    return f"{s['median_evals_to_tied']:g} [{lo:g}, {hi:g}]"


def _regret_diff(s, at: int) -> dict[str, str]:
    d, lo, hi = s["regret_minus_random"][str(at)]
    return {"v": f"{d:+.3f}", "lo": f"{lo:+.3f}", "hi": f"{hi:+.3f}"}


@cache
def af6q_gp() -> dict[str, str]:
    s = _replays("search_af6q_r4/replay_gp100/results.json")
    return (
        prefixed("r32", _regret_diff(s["gp"], 32))
        | prefixed("r40", _regret_diff(s["gp"], 40))
        | prefixed("t", _hits(s["gp"]["evals_to_tied_minus_random"]))
    )


@cache
def af6q_tpe() -> dict[str, str]:
    s = _replays("search_af6q_r4/replay100/results.json")
    return _regret_diff(s["tpe"], 40) | prefixed("evo", _regret_diff(s["evolution"], 40))


@cache
def afs4q_samplers() -> dict[str, str]:
    s = _replays("search_afs4q/replay100/results.json")
    out = {name: _median_ci(s[name]) for name in ("random", "gp", "tpe")}
    for name in ("gp", "tpe", "evolution"):
        out |= prefixed(name, _regret_diff(s[name], 32))
    return out


@cache
def pruners() -> dict[str, str]:
    out = {}
    for sampler in ("tpe", "gp"):
        rows = json.loads((RAW / f"pruner_{sampler}.json").read_text())["rows"]
        med = [r for r in rows if r["pruner"] == "median"]
        saved = [100 * r["tasks_saved_vs_none"] for r in med]
        out |= {
            f"{sampler}_saved": f"{statistics.fmean(saved):.1f}",
            f"{sampler}_std": f"{statistics.stdev(saved):.1f}",
            f"{sampler}_same": str(sum(r["same_best_as_none"] for r in med)),
            f"{sampler}_trained": f"{statistics.fmean(r['trained'] for r in med):.1f}",
        }
    return out


# The proxy itself: known answers, seed noise, cost.


@cache
def proxy_recall() -> dict[str, str]:
    by, _, _ = _study()
    acc = [by[p][s]["tasks"]["in_context_recall"]["accuracy"] for p in MIXERS for s in by[p]]
    mlp = statistics.fmean(
        r["tasks"]["in_context_recall"]["accuracy"] for r in by["FFFFFF"].values()
    )
    return {"lo": f2(min(acc)), "hi": f2(max(acc)), "mlp": f2(mlp)}


@cache
def proxy_seed_noise() -> dict[str, str]:
    by, _, _ = _study()
    named = [seed_std(_scores(by, p)) for p in NAMED]
    every = sorted(seed_std(_scores(by, p)) for p in by)
    return {
        "lo": f3(min(named)),
        "hi": f3(max(named)),
        "median": f3(every[len(every) // 2]),
        "n": str(len(every)),
    }


@cache
def proxy_fuzzy_gap() -> dict[str, str]:
    by, _, _ = _study()
    acc = {p: {s: r["tasks"][FUZZY]["accuracy"] for s, r in by[p].items()} for p in by}
    gaps = [acc[p][s] - acc["FFFFFF"][s] for p in ("AFAFAF", "AAAAAA", "AAFFFF") for s in acc[p]]
    return {"lo": f2(min(gaps)), "hi": f2(max(gaps))}


@cache
def proxy_cost() -> dict[str, str]:
    rows = json.loads((RAW / "calibration" / "cost_quiet.json").read_text())["rows"]
    three = "mad:in_context_recall,selective_copying,memorization"
    cpu = {
        f"{kind}_{p}": rows[f"{proxy}|default|{p}|0"]["cpu_s"]
        for kind, proxy in (("six", "mad"), ("three", three))
        for p in NAMED
    }
    span = [v for k, v in cpu.items() if k.startswith("three")]
    return {k: f"{v:.0f}" for k, v in cpu.items()} | {
        "three_lo": f"{min(span):.0f}",
        "three_hi": f"{max(span):.0f}",
    }


@cache
def proxy_levers() -> dict[str, str]:
    rows = json.loads((RAW / "calibration" / "levers.json").read_text())["rows"].values()

    def span(key: str, fmt: str) -> dict[str, str]:
        v = [r[key] for r in rows]
        return {"lo": format(min(v), fmt), "hi": format(max(v), fmt)}

    return (
        prefixed("compile", span("compile_speedup", ".2f"))
        | prefixed("payback", span("compile_payback_steps", ",.0f"))
        | prefixed("stack", span("stacked_speedup", ".2f"))
        | prefixed("bf16", span("bf16_speedup", ".2f"))
    )


# Efficiency and scaling.


@cache
def _decode():
    return json.loads((RAW / "bench_decode_10m_kernels.json").read_text())["contexts"]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


@cache
def decode_roofline() -> dict[str, str]:
    m = _decode()["16384"]["models"]
    out = {}
    for key, model in (("base", "(AF)*6"), ("hyb", "(AFSFSF)*2")):
        k, t = m[f"{model}/kernel"], m[f"{model}/torch"]
        out |= {
            key: _pct(k["fraction"]["median"]),
            f"{key}_lo": _pct(k["fraction"]["min"]),
            f"{key}_hi": _pct(k["fraction"]["max"]),
            f"{key}_torch": _pct(t["fraction"]["median"]),
            f"{key}_gain": f"{k['tokens_per_s']['median'] / t['tokens_per_s']['median']:.1f}",
        }
    return out


@cache
def decode_hybrid() -> dict[str, str]:
    out = {}
    for ctx, c in _decode().items():
        r = c["hybrid_over_baseline/kernel"]
        m = c["models"]
        out |= {
            f"r{ctx}": f2(r["median"]),
            f"lo{ctx}": f2(r["min"]),
            f"hi{ctx}": f2(r["max"]),
            f"b{ctx}": f2(m["(AF)*6/kernel"]["bytes"] / m["(AFSFSF)*2/kernel"]["bytes"]),
        }
    return out


@cache
def train_load() -> dict[str, str]:
    d = json.loads((RAW / "load" / "bench_load_split.json").read_text())
    quiet = statistics.fmean(d["train/default"]["quiet"])
    split = d["train/split"]
    return {
        "loaded": f2(statistics.fmean(split["loaded"]) / quiet),
        "quiet": f2(statistics.fmean(split["quiet"]) / quiet),
        "default": f2(statistics.fmean(d["train/default"]["loaded"]) / quiet),
    }


def _paired(seconds: dict[str, list[float]], num: str, den: str) -> dict[str, str]:
    """num's time over den's, round by round: median, lowest, highest."""
    per = [a / b for a, b in zip(seconds[num], seconds[den], strict=True)]
    return {"v": f2(statistics.median(per)), "lo": f2(min(per)), "hi": f2(max(per))}


@cache
def ssd_bound() -> dict[str, str]:
    out = {}
    for key, name in (("32", "bench_ssd_10m.json"), ("16", "bench_ssd_10m_bf16.json")):
        t = json.loads((RAW / "ssd_bound" / name).read_text())["seconds"]
        out |= prefixed(f"s{key}", _paired(t, "S:T2048:bound", "S:T2048:ours"))
        out |= prefixed(f"e{key}", _paired(t, "S:T2048:bound", "S:T2048:exact"))
        out |= prefixed(f"hf{key}", _paired(t, "S:T2048:hf", "S:T2048:ours"))
        out |= prefixed(f"d{key}", _paired(t, "D:T2048:bound", "D:T2048:D"))
        if key == "32":
            per = [b / s for s, b in zip(t["S:T2048:ours"], t["S:T2048:bound"], strict=True)]
            med = statistics.median(per)
            out["goal"] = f"{'met' if med >= 0.75 else 'missed'} at {med:.3f}"
    return out


@cache
def window_band() -> dict[str, str]:
    t = json.loads((RAW / "window" / "bench_window.json").read_text())["seconds"]
    return {
        **prefixed("aw", _paired(t, "A", "W")),
        **prefixed("mw", _paired(t, "W-masked", "W")),
        **prefixed("core", _paired(t, "core:A", "core:W")),
        **prefixed("c192", _paired(t, "W/192", "W")),
        **prefixed("c256", _paired(t, "W/256", "W")),
    }


@cache
def train_step() -> dict[str, str]:
    """Per configuration (dtype, T): transformers' CPU time over ours and (matmul + attention)
    over ours, paired per repetition: median, lowest, highest."""
    doc = json.loads((RAW / "train_step" / "bench_llama.json").read_text())
    out = {}
    for row in doc["rows"]:
        t = row["seconds"]
        bound = [m + a for m, a in zip(t["matmul"], t["attention"], strict=True)]
        key = f"{row['dtype']}{row['seq_len']}"
        out |= prefixed(f"{key}_speed", _paired(t, "transformers", "ours"))
        out |= prefixed(f"{key}_bound", _paired({"b": bound, "o": t["ours"]}, "b", "o"))
        out |= prefixed(f"{key}_cspeed", _paired(t, "transformers", "ours-compiled"))
        out[f"{key}_compile"] = f"{row['compile_wall_s']:.0f}"
    return out


@cache
def convert_vs_scratch() -> dict[str, str]:
    """The converted hybrid against the same hybrid from scratch (the study's own analysis)."""
    r = script("benchmarks/convert_vs_scratch.py").analyse(
        read_jsonl(RAW / "convert_vs_scratch" / "raw.jsonl")
    )
    out = {"t": f"{r['teacher_val_loss']:.3f}", "ns": str(len(r["scratch_seeds"]))}
    out["s"], out["s_sd"] = f"{r['scratch_final']['mean']:.3f}", f"{r['scratch_final']['sd']:.3f}"
    for pre, arm in (("", r), ("l", r["long"])):
        out[pre + "n"] = str(len(arm["converted_seeds"]))
        out[pre + "c"] = f"{arm['converted_final']['mean']:.3f}"
        out[pre + "c_sd"] = f"{arm['converted_final']['sd']:.3f}"
        out[pre + "gap"] = f"{arm['gap_to_teacher_pct']['mean']:.1f}"
        out[pre + "reach"] = "reached" if arm["token_ratio"] else "not reached"
        out[pre + "rev"] = f"{arm['reverse_token_ratio']['mean']:.1f}"
        out[pre + "revf"] = f"{arm['reverse_flop_ratio']['mean']:.1f}"
        rng = arm["reverse_token_ratio"]
        out[pre + "rev_range"] = f"{rng['min']:.1f}-{rng['max']:.1f}"
    out["goal"] = "met" if r["goal_met"] or r["long"]["goal_met"] else "missed"
    out["b"] = f"{r['converted_tokens']:,}"
    return out


@cache
def isoflop() -> dict[str, str]:
    doc = json.loads((RAW / "isoflop_cpu_full" / "results.json").read_text())
    out = {}
    for pattern in ("AF", "AAFFFF"):
        runs = [r for r in doc["runs"] if r["pattern"] == pattern and r["status"] == "completed"]
        front = fit_frontier(runs, bootstrap=0)
        a, s = front.n_exponent, front.loss_slope
        out |= prefixed(
            pattern,
            {
                "a": f3(a.slope),
                "a_lo": f3(a.ols_low),
                "a_hi": f3(a.ols_high),
                "s": f3(s.slope),
                "s_lo": f3(s.ols_low),
                "s_hi": f3(s.ols_high),
                "runs": str(len(runs)),
            },
        )
    return out


@dataclass(frozen=True)
class Figure:
    raw: tuple[str, ...]  # under benchmarks/results/
    compute: Callable[[], dict[str, str]]
    cell: str  # the leaderboard's figure cell, over compute()'s values


STUDY = ("proxy_rank_cpu/proxy_scores.jsonl", "proxy_rank_cpu/scale_losses.jsonl")
HELD = (*STUDY, "proxy_rank_cpu/heldout_session8.json")

FIGURES: dict[str, Figure] = {
    "scale-rho": Figure(STUDY, scale_rho, "{rho} [{lo}, {hi}] (p {p}; Kendall {tau}; n {n})"),
    "scale-heldout": Figure(
        HELD,
        scale_heldout,
        "fuzzy recall {rho} [{lo}, {hi}] (n {n}); six-task score {six} [{six_lo}, {six_hi}]",
    ),
    "scale-pairs": Figure(
        STUDY, scale_pairs, "{agree} of {both} ({pct}%) agree; the proxy separates {sep} of {pairs}"
    ),
    "task-subsets": Figure(
        HELD,
        scale_subsets,
        "fuzzy {all_fuzzy_v} [{all_fuzzy_lo}, {all_fuzzy_hi}], three tasks "
        "{all_quick_v} [{all_quick_lo}, {all_quick_hi}], difference "
        "{all_diff_v} [{all_diff_lo}, {all_diff_hi}]; held out: fuzzy "
        "{held_fuzzy_v}, three tasks {held_quick_v} [{held_quick_lo}, "
        "{held_quick_hi}]",
    ),
    "fuzzy-long": Figure(
        (*STUDY, "calibration/fuzzy_long_31.jsonl"),
        fuzzy_long,
        "{v} [{lo}, {hi}]; minus the default ({base}): {d_v} [{d_lo}, {d_hi}]",
    ),
    "fuzzy-mid": Figure(
        (*STUDY, "calibration/fuzzy_b64s400_31.jsonl"), fuzzy_mid, "{v} [{lo}, {hi}]"
    ),
    "fuzzy-control": Figure(
        (
            *STUDY,
            "calibration/fuzzy_default_31.jsonl",
            "calibration/fuzzy_long_31.jsonl",
            "calibration/fuzzy_b64s400_31.jsonl",
        ),
        fuzzy_control,
        "{v} [{lo}, {hi}]; 1,000 steps minus control {long_v} [{long_lo}, "
        "{long_hi}]; 400 steps minus control {mid_v} [{mid_lo}, {mid_hi}]",
    ),
    "picks-at-scale": Figure(
        (
            *AF6Q_LOGS,
            *AF6F_LOGS,
            "proxy_rank_cpu/scale_losses.jsonl",
            "proxy_rank_cpu_picks/scale_losses.jsonl",
        ),
        picks_at_scale,
        "af6f {f}, af6q {q}: difference {d} (rule: beyond 0.03)",
    ),
    "proxy-recall": Figure(
        STUDY[:1], proxy_recall, "mixers {lo}-{hi} on every seed; `FFFFFF` {mlp} (chance 0.125)"
    ),
    "proxy-seed-noise": Figure(
        STUDY[:1],
        proxy_seed_noise,
        "{lo}-{hi} for the five named patterns; median over {n} patterns {median}",
    ),
    "fuzzy-gap": Figure(STUDY[:1], proxy_fuzzy_gap, "{lo}-{hi} by seed (target 0.3: missed)"),
    "proxy-cost": Figure(
        ("calibration/cost_quiet.json",),
        proxy_cost,
        "six tasks: `AAFFFF` {six_AAFFFF}, `AFAFAF` {six_AFAFAF}, `AFSAFS` "
        "{six_AFSAFS}, `FFFFFF` {six_FFFFFF}, `SFSFSF` {six_SFSFSF}; three "
        "tasks: {three_AAFFFF}, {three_AFAFAF}, {three_AFSAFS}, "
        "{three_FFFFFF}, {three_SFSFSF}",
    ),
    "fuzzy-cost": Figure(
        ("calibration/fuzzy_default_31.jsonl",), fuzzy_cost, "{lo}-{hi} CPU-s (median {median})"
    ),
    "proxy-levers": Figure(
        ("calibration/levers.json",),
        proxy_levers,
        "compile {compile_lo}-{compile_hi}x, paying back after "
        "{payback_lo}-{payback_hi} steps; 3 stacked models "
        "{stack_lo}-{stack_hi}x; bf16 {bf16_lo}-{bf16_hi}x",
    ),
    "af6q-table": Figure(
        AF6Q_LOGS,
        af6q_table,
        "best `{best}` {score}; noise floor {floor}; {tied} tied; seed-to-seed "
        "Spearman {seed_lo}-{seed_hi}; with parameters {params}",
    ),
    "afs4q-table": Figure(
        AFS4Q_LOGS,
        afs4q_table,
        "best `{best}` {score}; noise floor {floor}; {tied} tied; seed-to-seed "
        "Spearman {seed_lo}; with parameters {params}",
    ),
    "af6q-gp": Figure(
        ("search_af6q_r4/replay_gp100/results.json",),
        af6q_gp,
        "after 32: {r32_v} [{r32_lo}, {r32_hi}]; after 40: {r40_v} [{r40_lo}, "
        "{r40_hi}]; evaluations to the tied set {t_v} [{t_lo}, {t_hi}]",
    ),
    "af6q-tpe": Figure(
        ("search_af6q_r4/replay100/results.json",),
        af6q_tpe,
        "TPE {v} [{lo}, {hi}]; evolution {evo_v} [{evo_lo}, {evo_hi}]",
    ),
    "afs4q-samplers": Figure(
        ("search_afs4q/replay100/results.json",),
        afs4q_samplers,
        "after 32: GP {gp_v} [{gp_lo}, {gp_hi}], TPE {tpe_v} [{tpe_lo}, "
        "{tpe_hi}], evolution {evolution_v} [{evolution_lo}, "
        "{evolution_hi}]; to the tied set: random {random}, GP {gp}, "
        "TPE {tpe}",
    ),
    "pruners": Figure(
        ("pruner_tpe.json", "pruner_gp.json"),
        pruners,
        "TPE: {tpe_saved}% ± {tpe_std}% saved, same best on {tpe_same} of 3 seeds; "
        "GP: stops after {gp_trained} of 20 trials, same best on {gp_same} of 3",
    ),
    "decode-roofline": Figure(
        ("bench_decode_10m_kernels.json",),
        decode_roofline,
        "`(AF)*6` {base}% [{base_lo}-{base_hi}%], `(AFSFSF)*2` {hyb}% "
        "[{hyb_lo}-{hyb_hi}%]; PyTorch paths {base_torch}% / "
        "{hyb_torch}%; kernels / PyTorch {base_gain}x / {hyb_gain}x",
    ),
    "decode-hybrid": Figure(
        ("bench_decode_10m_kernels.json",),
        decode_hybrid,
        "{r1024} / {r4096} / {r8192} / {r16384} [{lo16384}-{hi16384}]; the "
        "bytes allow {b1024} / {b4096} / {b8192} / {b16384}",
    ),
    "train-load": Figure(
        ("load/bench_load_split.json",),
        train_load,
        "{loaded} loaded, {quiet} quiet (unsplit default: {default} loaded)",
    ),
    "ssd-bound": Figure(
        ("ssd_bound/bench_ssd_10m.json", "ssd_bound/bench_ssd_10m_bf16.json"),
        ssd_bound,
        "fp32: S {s32_v} [{s32_lo}-{s32_hi}] (its exact form {e32_v} [{e32_lo}-{e32_hi}]), "
        "D {d32_v} [{d32_lo}-{d32_hi}]; bf16 autocast: S {s16_v} [{s16_lo}-{s16_hi}], D "
        "{d16_v} [{d16_lo}-{d16_hi}]; S / transformers' torch path {hf32_v}x (fp32), "
        "{hf16_v}x (bf16) (goal S >= 0.75 in fp32: {goal})",
    ),
    "window-band": Figure(
        ("window/bench_window.json",),
        window_band,
        "layer: A / W {aw_v}x [{aw_lo}-{aw_hi}], masked W / W {mw_v}x [{mw_lo}-{mw_hi}]; "
        "attention alone: A / W {core_v}x [{core_lo}-{core_hi}]; W in chunks of 192 and 256 "
        "takes {c192_v}x [{c192_lo}-{c192_hi}] and {c256_v}x [{c256_lo}-{c256_hi}] "
        "W's time (chunks of 128)",
    ),
    "train-step": Figure(
        ("train_step/bench_llama.json",),
        train_step,
        "speed bf16 {bf16256_speed_v}x [{bf16256_speed_lo}-{bf16256_speed_hi}] (T 256), "
        "{bf16512_speed_v}x [{bf16512_speed_lo}-{bf16512_speed_hi}] (T 512); fp32 "
        "{fp32256_speed_v}x [{fp32256_speed_lo}-{fp32256_speed_hi}], {fp32512_speed_v}x "
        "[{fp32512_speed_lo}-{fp32512_speed_hi}]; bound fraction bf16 {bf16256_bound_v} / "
        "{bf16512_bound_v}, fp32 {fp32256_bound_v} / {fp32512_bound_v}; compiled bf16 "
        "{bf16256_cspeed_v}x / {bf16512_cspeed_v}x after {bf16256_compile}-{bf16512_compile} s "
        "of compiling (goals 1.2x: missed; 0.85: fp32 T 512 only)",
    ),
    "convert-vs-scratch": Figure(
        ("convert_vs_scratch/raw.jsonl",),
        convert_vs_scratch,
        "converted, distilled B = {b} tokens: {c} ± {c_sd} ({n} seeds), {gap}% above the "
        "teacher's {t}; 4 B: {lc} ± {lc_sd} ({ln} seeds), {lgap}% above; from scratch on 16 B: "
        "{s} ± {s_sd} ({ns} seeds), {reach} by the converted after B, {lreach} after 4 B; from "
        "scratch passes the converted losses after {rev}x (range {rev_range}) and {lrev}x "
        "(range {lrev_range}) their tokens ({revf}x, {lrevf}x the FLOPs, teacher passes "
        "counted) (goal 10x within 5%: {goal})",
    ),
    "isoflop": Figure(
        ("isoflop_cpu_full/results.json",),
        isoflop,
        "`AF` a = {AF_a} [{AF_a_lo}, {AF_a_hi}], slope {AF_s} [{AF_s_lo}, "
        "{AF_s_hi}]; `AAFFFF` a = {AAFFFF_a} [{AAFFFF_a_lo}, {AAFFFF_a_hi}], "
        "slope {AAFFFF_s} [{AAFFFF_s_lo}, {AAFFFF_s_hi}]",
    ),
}

# README.md's prose: (figure id, fragment over that figure's values).
README_CLAIMS: list[tuple[str, str]] = [
    ("proxy-recall", "MAD in-context recall ({lo}-{hi} on 3 seeds)"),
    ("proxy-recall", "stays at chance ({mlp})"),
    ("proxy-seed-noise", "seed std is {lo}-{hi} for the five patterns"),
    (
        "scale-rho",
        "on {n} patterns trained at twice the width on 2M tokens, Spearman {rho} with a 95% "
        "interval of [{lo}, {hi}]",
    ),
    ("scale-heldout", "gives {rho} [{lo}, {hi}] on the {n} patterns"),
    ("afs4q-samplers", "regret after 32 evaluations is {gp_v} [{gp_lo}, {gp_hi}] below random's"),
    ("af6q-gp", "GP's is {r32_v} [{r32_lo}, {r32_hi}] below after 32"),
    ("af6q-tpe", "TPE's {v} [{lo}, {hi}] after 40"),
    ("task-subsets", "against scale: {all_quick_v} [{all_quick_lo}, {all_quick_hi}] on the 31"),
    ("task-subsets", "{held_quick_v} on the 23 held-out ones"),
    (
        "task-subsets",
        "gives {all_fuzzy_v} [{all_fuzzy_lo}, {all_fuzzy_hi}]: better by "
        "{all_diff_v} [{all_diff_lo}, {all_diff_hi}]",
    ),
    ("fuzzy-cost", "({lo}-{hi} CPU-s a trial against"),
    ("proxy-cost", "against {three_lo}-{three_hi})"),
    ("picks-at-scale", "(mean loss {f} against {q}, inside the noise"),
    (
        "decode-roofline",
        "{base}-{hyb}% of the memory roofline, {base_gain}-{hyb_gain}x the PyTorch paths",
    ),
    (
        "convert-vs-scratch",
        "distilled on {b} tokens ends {gap}% above the teacher ({n} seeds), on 4x that {lgap}% "
        "above ({ln} seeds)",
    ),
    ("convert-vs-scratch", "passes their losses after {rev}x and {lrev}x their tokens"),
]
# Numbers README.md quotes from elsewhere (the paper), not from this project's data.
README_QUOTED = ("Composer reports 0.9-0.97",)


@dataclass(frozen=True)
class Row:
    id: str
    what: str
    figure: str
    raw: str
    command: str
    date: str


def leaderboard() -> dict[str, Row]:
    rows = {}
    for line in RESULTS_MD.read_text().splitlines():
        m = re.match(r'\| <a id="([a-z0-9-]+)"></a>', line)
        if not m:
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 6, f"row {m.group(1)}: {len(cells)} cells, expected 6"
        assert m.group(1) not in rows, f"row {m.group(1)} twice"
        rows[m.group(1)] = Row(m.group(1), *cells[1:])
    return rows


def raw_links(cell: str) -> list[str]:
    """The raw files a row links to, relative to benchmarks/results/."""
    return [h.removeprefix("results/") for h in re.findall(r"\]\((results/[^)\s]+)\)", cell)]


def test_leaderboard_is_short_and_every_recipe_has_a_row():
    assert len(RESULTS_MD.read_text().splitlines()) <= 100
    rows = leaderboard()
    assert set(FIGURES) <= set(rows), f"no row for {sorted(set(FIGURES) - set(rows))}"
    for row in rows.values():
        if row.id not in FIGURES:
            assert NOT_KEPT in row.raw, f"row {row.id}: no recipe, and it does not say '{NOT_KEPT}'"
            assert not raw_links(row.raw), f"row {row.id}: links raw files but has no recipe"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.date), f"row {row.id}: date {row.date!r}"
        assert row.command.startswith("`"), f"row {row.id}: no command"


@pytest.mark.parametrize("fid", sorted(FIGURES))
def test_figure_matches_its_raw_data(fid):
    fig, row = FIGURES[fid], leaderboard()[fid]
    assert sorted(raw_links(row.raw)) == sorted(fig.raw), f"row {fid} links other raw files"
    for path in fig.raw:
        assert (RAW / path).is_file(), f"row {fid}: {path} is missing"
    assert row.figure == fig.cell.format(**fig.compute()), (
        f"row {fid}: the text says\n  {row.figure}\nits raw data give\n  "
        f"{fig.cell.format(**fig.compute())}"
    )


def _first_commit(path: Path) -> str | None:
    out = subprocess.run(
        ["git", "log", "--format=%ad", "--date=short", "--", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[-1] if out else None


def test_dates_are_the_raw_files_first_commits():
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    shallow = subprocess.run(
        [git, "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if shallow == "true":
        pytest.skip("a shallow clone does not know when files were first committed")
    rows = leaderboard()
    for fid, fig in FIGURES.items():
        dates = [_first_commit(RAW / p) for p in fig.raw]
        if None in dates:
            continue  # a raw file not committed yet: its date is not known
        assert rows[fid].date == max(dates), f"row {fid}: date {rows[fid].date}, raw {max(dates)}"


def _values(fid: str) -> dict[str, str]:
    return FIGURES[fid].compute()


def test_readme_quotes_the_figures():
    text = " ".join(README.read_text().split())
    for fid, fragment in README_CLAIMS:
        want = fragment.format(**_values(fid))
        assert want in text, f"README.md should say {want!r} (figure {fid})"


DECIMAL = re.compile(r"[-+]?\d+\.\d+")


def test_readme_figure_paragraphs_have_no_unchecked_numbers():
    claims = [fragment.format(**_values(fid)) for fid, fragment in README_CLAIMS]
    for para in re.split(r"\n\s*\n", README.read_text()):
        if "benchmarks/RESULTS.md" not in para or para.lstrip().startswith("```"):
            continue
        flat = " ".join(para.split())
        for sentence in re.split(r"(?<=[.;:])\s+(?=[A-Z(`*])", flat):
            if NOT_KEPT in sentence:
                continue
            for quoted in (*claims, *README_QUOTED):
                sentence = sentence.replace(quoted, " ")
            # Link targets and code spans hold paths and commands, not figures.
            sentence = re.sub(r"\]\([^)]*\)|`[^`]*`", " ", sentence)
            left = DECIMAL.findall(sentence)
            assert not left, f"README.md: {left} in {sentence!r} are checked by no claim"


def test_every_study_folder_has_a_readme_and_the_index_names_everything():
    index = (RAW / "README.md").read_text()
    for entry in sorted(RAW.iterdir()):
        if entry.name.startswith(".") or entry.name == "README.md":
            continue
        name = entry.name + ("/" if entry.is_dir() else "")
        assert f"`{name}`" in index, f"benchmarks/results/README.md does not index {name}"
        if entry.is_dir():
            assert (entry / "README.md").is_file(), f"{name} has no README.md"


SESSION = re.compile(r"\b(session|issue)s? \d", re.IGNORECASE)


def test_user_facing_text_names_dates_not_sessions():
    files = [
        README,
        RESULTS_MD,
        ROOT / "docs" / "history" / "results-log.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted(RAW.glob("*/README.md")),
    ]
    for path in files:
        if path.parent.name == "ruler_v3":
            continue  # a live study's own README, written by its owner
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not SESSION.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"


def test_load_table_agrees_with_the_logs():
    """The committed af6q asset is the table the af6q logs assemble to."""
    table = load_table("af6q")
    per_seed = _per_seed(*AF6Q_LOGS)
    assert set(table.scores) == set(per_seed)
    for p, v in per_seed.items():
        assert table.scores[p] == pytest.approx(statistics.fmean(v))
