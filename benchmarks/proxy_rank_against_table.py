"""Another proxy against the same scale runs: a committed table's scores vs a study's losses.

A `hcomposer proxy-rank` study trains each pattern at scale once; any other proxy that has
scored the same patterns can be checked against those losses without training again. The
committed tables (`af6q`, `afs4q`) score whole spaces on the quickstart proxy (three tasks),
so this asks whether the proxy `hcomposer run` searches with ranks patterns as scale does:

    python benchmarks/proxy_rank_against_table.py --study benchmarks/results/proxy_rank_cpu \
        --table af6q --out benchmarks/results/proxy_rank_cpu/against_af6q.json

Prints, for the study's patterns that the table holds, the table's score (seed mean) and the
loss at scale, then Spearman (table score vs minus the loss) with its 95% bootstrap interval,
overall and for each of the table's tasks. Nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from hcomposer.errors import UserError
    from hcomposer.io import atomic_write_json
    from hcomposer.proxies.rank_correlation import study_scale_losses
    from hcomposer.search.tabular import load_table
    from hcomposer.stats import spearman_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="a proxy-rank study folder")
    p.add_argument("--table", default="af6q", help="a committed table name or a table JSON")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        log = Path(args.study) / "scale_losses.jsonl"
        if not log.is_file():
            raise UserError(f"--study {args.study}: no scale_losses.jsonl; give a study folder")
        loss = study_scale_losses(args.study)
        table = load_table(args.table)
        pats = sorted(p for p in loss if p in table.scores)
        if len(pats) < 3:
            raise UserError(
                f"--table {args.table} holds {len(pats)} of the study's patterns; need 3"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    neg = [-loss[p] for p in pats]
    rho, lo, hi = spearman_ci([table.scores[p] for p in pats], neg)
    by_task = {}
    acc = table.meta.get("task_accuracy") or {}  # pattern -> task -> mean accuracy
    for task in acc.get(pats[0], {}):
        if all(task in acc.get(p, {}) for p in pats):
            by_task[task] = spearman_ci([acc[p][task] for p in pats], neg)
    print(f"{'pattern':<8} {'table score':>11} {'loss at scale':>13}")
    for p in sorted(pats, key=lambda q: -table.scores[q]):
        print(f"{p:<8} {table.scores[p]:>11.4f} {loss[p]:>13.4f}")
    print(f"Spearman ({table.name} score vs -loss), n={len(pats)}: {rho:.2f} [{lo:.2f}, {hi:.2f}]")
    for task, (r, a, b) in by_task.items():
        print(f"  {task}: {r:.2f} [{a:.2f}, {b:.2f}]")
    if args.out:
        atomic_write_json(
            args.out,
            {
                "study": args.study,
                "table": table.name,
                "patterns": pats,
                "table_scores": {p: table.scores[p] for p in pats},
                "scale_loss": loss,
                "spearman": rho,
                "spearman_ci": [lo, hi],
                "task_spearman": {
                    t: {"spearman": v[0], "ci": [v[1], v[2]]} for t, v in by_task.items()
                },
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
