"""A changed proxy against a study's scale runs, beside the proxy the study used.

A `hcomposer proxy-rank` study trains each pattern at scale once. A candidate change to the
proxy (a task's budget, batch or difficulty, as a `ProxyConfig` JSON) can be checked against
those losses without training at scale again: this scores the study's patterns with the
candidate, then prints Spearman (candidate vs minus the loss at scale) with its 95%
bootstrap interval, next to the study's own proxy on the same tasks and seeds, and the
paired bootstrap interval of the difference (patterns resampled together).

    python benchmarks/proxy_variant_against_scale.py --study benchmarks/results/proxy_rank_cpu \
        --proxy mad:fuzzy --config cand.json --seeds 0 --out cand.jsonl [--shard 0/2]
    python benchmarks/proxy_variant_against_scale.py --study ... --proxy mad:fuzzy \
        --config cand.json --seeds 0 --out cand.jsonl --report cand.json   # no training

The study's values and the candidate's share the data of each seed but not the initial
weights: a task's weights are seeded by its place in the evaluation (fuzzy recall is second
of six in the study, first in ``mad:fuzzy``). To separate the config change from that, score
the default config the same way (no ``--config``) as a control.

Each evaluation is appended to ``--out`` as it finishes (with the config's digest); a rerun
skips what is there, so a killed run resumes and shards may share the file. The study's
value for a task and seed is that task's accuracy in the study's six-task evaluation (for
a whole-score candidate, ``--proxy mad``, its score).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path


def _study_values(study: Path, tasks: list[str] | None) -> dict[str, dict[int, float]]:
    """pattern -> seed -> the study's value (mean accuracy over ``tasks``, else the score)."""
    from hcomposer.io import read_jsonl

    out: dict[str, dict[int, float]] = {}
    for r in read_jsonl(study / "proxy_scores.jsonl"):
        if tasks:
            v = statistics.fmean(r["tasks"][t]["accuracy"] for t in tasks)
        else:
            v = r["score"]
        out.setdefault(r["pattern"], {})[int(r["seed"])] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    from hcomposer.architecture import Architecture
    from hcomposer.errors import UserError
    from hcomposer.io import append_jsonl, atomic_write_json, read_jsonl
    from hcomposer.proxies.proxy import evaluate_proxy, parse_proxy
    from hcomposer.proxies.proxy_config import ProxyConfig
    from hcomposer.proxies.rank_correlation import study_scale_losses
    from hcomposer.stats import spearman_ci, spearman_diff_ci

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="a proxy-rank study folder")
    p.add_argument("--proxy", default="mad", help="mad or mad:TASK[,TASK]")
    p.add_argument("--config", type=Path, default=None, help="the candidate ProxyConfig JSON")
    p.add_argument("--seeds", default="0")
    p.add_argument("--patterns", default=None, help="default: every pattern of the study")
    p.add_argument("--shard", default="0/1", help="i/n: this worker's share of the patterns")
    p.add_argument("--out", required=True, type=Path, help="the evaluations' log (JSONL)")
    p.add_argument("--report", type=Path, default=None, help="write the comparison here")
    args = p.parse_args(argv)
    try:
        if not (args.study / "scale_losses.jsonl").is_file():
            raise UserError(f"--study {args.study}: no scale_losses.jsonl; give a study folder")
        config = ProxyConfig.from_json(args.config) if args.config else ProxyConfig()
        kind, names = parse_proxy(args.proxy)
        if kind != "mad":
            raise UserError(f"--proxy {args.proxy}: only mad and mad:TASK[,TASK] are in a study")
        tasks = list(names) or None  # None: the whole of MAD, compared on the score
        seeds = [int(s) for s in args.seeds.split(",")]
        i, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= i < n:
            raise UserError(f"--shard {args.shard}: give I/N with 0 <= I < N")
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    losses = study_scale_losses(args.study)
    study = _study_values(args.study, tasks)
    pats = sorted(args.patterns.split(",") if args.patterns else (q for q in losses if q in study))
    digest = hashlib.sha256(
        json.dumps([args.proxy, config.to_dict()], sort_keys=True).encode()
    ).hexdigest()[:16]
    done = (
        {(r["pattern"], r["seed"]): r for r in read_jsonl(args.out) if r.get("digest") == digest}
        if args.out.is_file()
        else {}
    )
    if args.report is None:
        for k, pattern in enumerate(pats):
            if k % n != i:
                continue
            for seed in seeds:
                if (pattern, seed) in done:
                    continue
                t0 = time.process_time()
                r = evaluate_proxy(
                    Architecture.parse(pattern, "proxy"), args.proxy, seed=seed, config=config
                )
                rec = {
                    "pattern": pattern,
                    "seed": seed,
                    "digest": digest,
                    "score": r.score,
                    "cpu_s": round(time.process_time() - t0, 1),
                    "tasks": {
                        t: {
                            "accuracy": v["accuracy"],
                            "steps": sum(g["steps"] for g in v["grid"]),
                            "tries": len(v["grid"]),
                        }
                        for t, v in r.tasks.items()
                    },
                }
                append_jsonl(args.out, rec)
                print(json.dumps(rec), flush=True)
        return 0
    # Report: candidate and study on the patterns and seeds both have.
    have = [
        q
        for q in pats
        if q in losses
        and all((q, s) in done for s in seeds)
        and all(s in study.get(q, {}) for s in seeds)
    ]
    if len(have) < 3:
        print(f"error: {len(have)} patterns scored on every seed; need 3", file=sys.stderr)
        return 2
    neg = [-losses[q] for q in have]
    cand = [statistics.fmean(done[(q, s)]["score"] for s in seeds) for q in have]
    base = [statistics.fmean(study[q][s] for s in seeds) for q in have]
    rc = spearman_ci(cand, neg)
    rb = spearman_ci(base, neg)
    rd = spearman_diff_ci(cand, base, neg)
    print(f"{'pattern':<22} {'candidate':>9} {'study':>7} {'loss at scale':>13}")
    for q, c, b in sorted(zip(have, cand, base), key=lambda t: -t[1]):
        print(f"{q:<22} {c:>9.3f} {b:>7.3f} {losses[q]:>13.4f}")
    print(f"n = {len(have)} patterns, seeds {seeds}")
    print(
        f"Spearman vs -loss: candidate {rc[0]:.2f} [{rc[1]:.2f}, {rc[2]:.2f}], "
        f"study's proxy {rb[0]:.2f} [{rb[1]:.2f}, {rb[2]:.2f}]; "
        f"difference {rd[0]:+.2f} [{rd[1]:+.2f}, {rd[2]:+.2f}]"
    )
    cpu = [done[(q, s)]["cpu_s"] for q in have for s in seeds]
    print(
        f"candidate CPU-s per evaluation: median {statistics.median(cpu):.0f}, "
        f"range {min(cpu):.0f}-{max(cpu):.0f}"
    )
    atomic_write_json(
        args.report,
        {
            "study": str(args.study),
            "proxy": args.proxy,
            "config": config.to_dict(),
            "seeds": seeds,
            "patterns": have,
            "candidate": dict(zip(have, cand)),
            "study_values": dict(zip(have, base)),
            "scale_loss": {q: losses[q] for q in have},
            "spearman_candidate": list(rc),
            "spearman_study": list(rb),
            "spearman_difference": list(rd),
            "cpu_s": {f"{q}|{s}": done[(q, s)]["cpu_s"] for q in have for s in seeds},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
