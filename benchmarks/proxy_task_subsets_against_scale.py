"""Which of the MAD proxy's tasks rank patterns as scale does: subsets of a study's tasks.

A `hcomposer proxy-rank` study on the full MAD proxy records every task's accuracy for each
pattern and seed, next to each pattern's loss at scale. A score built from a subset of the
tasks (the mean of their accuracies, averaged over the seeds) can therefore be checked
against scale without training anything. For each subset this prints Spearman with minus
the loss at scale (95% bootstrap interval) and its difference from the quickstart's
three-task subset (paired bootstrap: the patterns are resampled together), on all of the
study's patterns and, with ``--heldout``, on the patterns a held-out test used.

    python benchmarks/proxy_task_subsets_against_scale.py \
        --study benchmarks/results/proxy_rank_cpu \
        --heldout benchmarks/results/proxy_rank_cpu/heldout_session8.json

Exploratory: the subsets are not chosen in advance, except fuzzy recall alone, which
was tested on held-out patterns on 2026-12-02 (`benchmarks/RESULTS.md`, row scale-heldout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

QUICK = ("in_context_recall", "selective_copying", "memorization")
SUBSETS = {
    "all six": None,
    "quickstart's three (recall, copying, memorisation)": QUICK,
    "the three + fuzzy recall": QUICK + ("fuzzy_in_context_recall",),
    "fuzzy recall alone": ("fuzzy_in_context_recall",),
    "recall, fuzzy recall, copying": (
        "in_context_recall",
        "fuzzy_in_context_recall",
        "selective_copying",
    ),
    "all but memorisation": (
        "in_context_recall",
        "fuzzy_in_context_recall",
        "noisy_in_context_recall",
        "selective_copying",
        "compression",
    ),
}


def main(argv: list[str] | None = None) -> int:
    from hcomposer.io import read_jsonl
    from hcomposer.proxies.rank_correlation import study_scale_losses
    from hcomposer.stats import spearman_ci, spearman_diff_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path)
    p.add_argument("--heldout", type=Path, default=None, help="a held-out result JSON")
    args = p.parse_args(argv)
    if not (args.study / "scale_losses.jsonl").is_file():
        print(f"error: --study {args.study}: no scale_losses.jsonl", file=sys.stderr)
        return 2
    losses = study_scale_losses(args.study)
    acc: dict[str, list[dict[str, float]]] = {}
    for r in read_jsonl(args.study / "proxy_scores.jsonl"):
        acc.setdefault(r["pattern"], []).append({t: v["accuracy"] for t, v in r["tasks"].items()})
    pats = sorted(q for q in losses if q in acc)
    groups = {"all patterns": pats}
    if args.heldout:
        held = {pt["pattern"] for pt in json.loads(args.heldout.read_text())["points"]}
        groups["held-out patterns"] = [q for q in pats if q in held]

    def score(q: str, tasks) -> float:
        return statistics.fmean(statistics.fmean(s[t] for t in (tasks or s)) for s in acc[q])

    print("| patterns | n | tasks | Spearman vs -loss | minus the quickstart's three |")
    print("|---|---|---|---|---|")
    for group, qs in groups.items():
        neg = [-losses[q] for q in qs]
        base = [score(q, QUICK) for q in qs]
        for name, tasks in SUBSETS.items():
            x = [score(q, tasks) for q in qs]
            r, lo, hi = spearman_ci(x, neg)
            d, dlo, dhi = spearman_diff_ci(x, base, neg)
            diff = "-" if tasks == QUICK else f"{d:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
            print(f"| {group} | {len(qs)} | {name} | {r:.2f} [{lo:.2f}, {hi:.2f}] | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
