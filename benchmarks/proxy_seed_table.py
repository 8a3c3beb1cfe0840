"""Per-task, per-seed table of MAD proxy evaluations, with the calibration targets checked.

Reads the proxy log of a proxy-to-scale study (``hcomposer proxy-rank``'s
``proxy_scores.jsonl``: one line per pattern and seed, with every task's accuracy) and
prints, as Markdown, each pattern's score (mean and sample std over its seeds), each
task's accuracy by seed, the restarts taken, and the seconds per evaluation; then the
calibration targets of the default proxy (docs/proxies.md) against those rows.

    python benchmarks/proxy_seed_table.py runs/proxy_rank/proxy_scores.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hcomposer.io import read_jsonl
from hcomposer.stats import seed_std

TASKS = (
    ("in_context_recall", "recall"),
    ("fuzzy_in_context_recall", "fuzzy"),
    ("noisy_in_context_recall", "noisy"),
    ("selective_copying", "copy"),
    ("compression", "compress"),
    ("memorization", "memorise"),
)
CHANCE_RECALL = 1 / 8


def _accuracy(task) -> float:
    return task["accuracy"] if isinstance(task, dict) else float(task[0])


def _restarts(task) -> int | None:
    """Restarts taken on one task; None where the row does not list its runs (an imported
    summary row)."""
    if not isinstance(task, dict) or "grid" not in task:
        return None
    return sum(1 for g in task["grid"] if g.get("restart"))


def rows_by_pattern(lines: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in lines:
        out.setdefault(r["pattern"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["seed"])
    return out


def table(by: dict[str, list[dict]]) -> list[str]:
    head = "| pattern | seeds | score mean ± std | " + " | ".join(t for _, t in TASKS)
    lines = [head + " | restarts | seconds per evaluation |", "|---" * (len(TASKS) + 5) + "|"]
    for pat, rows in sorted(by.items(), key=lambda kv: -_mean([r["score"] for r in kv[1]])):
        scores = [r["score"] for r in rows]
        cells = []
        for name, _ in TASKS:
            accs = [_accuracy(r["tasks"][name]) for r in rows if name in r["tasks"]]
            cells.append("/".join(f"{a:.2f}" for a in accs))
        counts = [_restarts(t) for r in rows for t in r["tasks"].values()]
        known = [c for c in counts if c is not None]
        restarts = str(sum(known)) + ("" if len(known) == len(counts) else " (+ unlisted)")
        secs = [r.get("wall_seconds", 0.0) for r in rows]
        lines.append(
            f"| `{pat}` | {','.join(str(r['seed']) for r in rows)} | "
            f"{_mean(scores):.3f} ± {seed_std(scores):.3f} | " + " | ".join(cells) + " | "
            f"{restarts} | {min(secs):.0f}-{max(secs):.0f} |"
        )
    return lines


def targets(by: dict[str, list[dict]]) -> list[str]:
    def task(pat: str, name: str) -> list[float]:
        return [_accuracy(r["tasks"][name]) for r in by.get(pat, []) if name in r["tasks"]]

    out = ["", "| target | measured | met |", "|---|---|---|"]

    def row(what: str, measured: str, ok: bool | None) -> None:
        out.append(f"| {what} | {measured} | {'-' if ok is None else ('yes' if ok else 'no')} |")

    a, f, s = (
        task("AFAFAF", "in_context_recall"),
        task("FFFFFF", "in_context_recall"),
        task("SFSFSF", "in_context_recall"),
    )
    if a and f and s:
        row(
            "recall: `AFAFAF` >= 0.9, `FFFFFF` <= chance + 0.1, `SFSFSF` >= 0.5 (seed means)",
            f"{_mean(a):.3f} / {_mean(f):.3f} / {_mean(s):.3f}",
            _mean(a) >= 0.9 and _mean(f) <= CHANCE_RECALL + 0.1 and _mean(s) >= 0.5,
        )
    for name, label in TASKS[1:4]:
        mlp = task("FFFFFF", name)
        for att in ("AFAFAF", "AAAAAA", "AAFFFF"):
            mine = task(att, name)
            if mine and mlp:
                gaps = [x - y for x, y in zip(mine, mlp)]
                row(
                    f"{label}: `{att}` - `FFFFFF` >= 0.3 (by seed)",
                    "/".join(f"{g:.2f}" for g in gaps),
                    min(gaps) >= 0.3,
                )
    fm, am = task("FFFFFF", "memorization"), task("AAAAAA", "memorization")
    if fm and am:
        gaps = [x - y for x, y in zip(fm, am)]
        row("memorisation: `FFFFFF` - `AAAAAA` >= 0.2 (by seed)",
            "/".join(f"{g:.2f}" for g in gaps), min(gaps) >= 0.2)  # fmt: skip
    for pat in ("AFAFAF", "AAFFFF", "FFFFFF", "SFSFSF", "AFSAFS"):
        scores = [r["score"] for r in by.get(pat, [])]
        if len(scores) > 1:
            row(f"seed std of `{pat}`'s score <= 0.02", f"{seed_std(scores):.4f}",
                seed_std(scores) <= 0.02)  # fmt: skip
    return out


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path, help="a proxy_scores.jsonl of hcomposer proxy-rank")
    args = p.parse_args(argv)
    if not args.log.is_file():
        print(f"error: {args.log} is not a file", file=sys.stderr)
        return 2
    by = rows_by_pattern(read_jsonl(args.log))
    print("\n".join(table(by) + targets(by)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
