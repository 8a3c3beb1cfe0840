"""Build a tabular search benchmark: score every pattern of a small space on a fixed proxy.

    python benchmarks/build_tabular.py                       # af6: 64 A/F patterns
    python benchmarks/build_tabular.py --limit 2 --work /tmp/t.jsonl --out /tmp/t.json

Every (pattern, seed) evaluation is appended as one JSON line to ``--work`` as soon as it
finishes (``hcomposer.io.append_jsonl``: flushed and fsynced, a killed run keeps every
whole line); a rerun skips the evaluations already there for the same configuration.
When every evaluation is done the table (mean score over seeds per pattern, per-seed
scores, per-task results, the exact configuration and this command) is written
atomically to ``--out``. The committed ``af6`` table is ``src/hcomposer/assets/tabular/
af6.json``; ``hcomposer bench-search`` replays samplers against it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="af6")
    p.add_argument("--choices", default="AF", help="one token per choice (default AF)")
    p.add_argument("--positions", type=int, default=6)
    p.add_argument("--proxy", default="mad", help="evaluate_proxy's proxy name (default mad)")
    p.add_argument(
        "--proxy-config",
        default=None,
        help="JSON object passed to evaluate_proxy(config=...) (default: the proxy's own)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--shape", default="proxy", help="shape preset of every model (default proxy)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="table JSON (default: the package asset)")
    p.add_argument("--work", default=None, help="resumable log (default /tmp/hcomposer-tabular)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N patterns (tests)")
    return p.parse_args(argv)


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from hcomposer.architecture import Architecture
    from hcomposer.evaluation.proxy import evaluate_proxy
    from hcomposer.io import append_jsonl, atomic_write_json, git_revision, read_jsonl
    from hcomposer.search.tabular import FORMAT, Table

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    proxy_config = json.loads(args.proxy_config) if args.proxy_config else None
    out = (
        Path(args.out) if args.out else ROOT / "src/hcomposer/assets/tabular" / f"{args.name}.json"
    )
    work = Path(args.work) if args.work else Path("/tmp/hcomposer-tabular") / f"{args.name}.jsonl"
    work.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "choices": list(args.choices),
        "positions": args.positions,
        "proxy": args.proxy,
        "proxy_config": proxy_config,
        "seeds": seeds,
        "shape": args.shape,
    }
    key = _fingerprint(config)
    patterns = ["".join(p) for p in itertools.product(args.choices, repeat=args.positions)]
    if args.limit is not None:
        patterns = patterns[: args.limit]
    done = {
        (r["pattern"], r["seed"]): r
        for r in (read_jsonl(work) if work.exists() else [])
        if r.get("key") == key
    }
    todo = [(p, s) for p in patterns for s in seeds if (p, s) not in done]
    print(
        f"{args.name}: {len(patterns)} patterns x {len(seeds)} seeds, {len(done)} done, "
        f"{len(todo)} to go; log {work}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    for i, (pattern, seed) in enumerate(todo, 1):
        arch = Architecture.parse(pattern, shape=args.shape)
        res = evaluate_proxy(arch, args.proxy, seed=seed, config=proxy_config)
        record = {"key": key, "pattern": pattern, "seed": seed, **res.to_dict()}
        record["score"] = float(res.score)
        append_jsonl(work, record)
        done[(pattern, seed)] = record
        elapsed = time.perf_counter() - start
        eta = elapsed / i * (len(todo) - i)
        print(
            f"[{i}/{len(todo)}] {pattern} seed {seed}: score {res.score:.4f} "
            f"({res.wall_seconds:.1f} s; eta {eta / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )
    if args.limit is not None:
        print("--limit given: table not written", file=sys.stderr)
        return 0
    per_seed = {p: {str(s): done[(p, s)]["score"] for s in seeds} for p in patterns}
    tasks: dict[str, dict] = {}
    for p in patterns:
        names = done[(p, seeds[0])].get("tasks", {})
        tasks[p] = {
            t: {m: sum(done[(p, s)]["tasks"][t][m] for s in seeds) / len(seeds) for m in names[t]}
            for t in names
        }
    params = {p: done[(p, seeds[0])].get("params_total") for p in patterns}
    wall = sum(done[(p, s)].get("wall_seconds", 0.0) for p in patterns for s in seeds)
    table = Table(
        name=args.name,
        choices=tuple(args.choices),
        positions=args.positions,
        scores={p: sum(v.values()) / len(v) for p, v in per_seed.items()},
    )
    doc = {
        **table.to_dict(),
        "format": FORMAT,
        "score": f"mean over seeds of evaluate_proxy(...).score ({args.proxy}); higher is better",
        "config": config,
        "command": "python " + shlex.join(["benchmarks/build_tabular.py", *(argv or sys.argv[1:])]),
        "evaluation_seconds": wall,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "per_seed": per_seed,
        "tasks": tasks,
        "params_total": params,
    }
    atomic_write_json(out, doc)
    print(
        f"wrote {out} ({len(patterns)} patterns, {wall / 60:.1f} min of evaluation)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
