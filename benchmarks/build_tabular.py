"""Build a tabular search benchmark: score every pattern of a small space on a fixed proxy.

    python benchmarks/build_tabular.py --seeds 0,1                 # af6: 64 A/F patterns
    python benchmarks/build_tabular.py --seeds 0,1 --shard 3/8     # one of 8 parallel workers
    python benchmarks/build_tabular.py --seeds 0,1 --assemble      # write the table only

Every (pattern, seed) evaluation is appended as one JSON line to a log in ``--work`` as
soon as it finishes (``hcomposer.io.append_jsonl``: flushed and fsynced, so a killed run
keeps every whole line); a rerun skips the evaluations already in any log of that folder
for the same configuration, so runs resume and shards combine. When every evaluation is
done the table (mean score over seeds per pattern, per-seed scores, per-task results,
the exact proxy configuration and the command) is written atomically to ``--out``
(default: the package asset ``src/hcomposer/assets/tabular/<name>.json``), which
``hcomposer bench-search`` replays samplers against.

The proxy runs on the CPU (``evaluate_proxy`` trains on the CPU); ``--threads`` fixes
torch's thread count per process so that shards do not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
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
        help="JSON object of ProxyConfig fields to change (default: the proxy's defaults)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--shape", default="proxy", help="shape preset of every model (default proxy)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--shard", default=None, help="I/N: evaluate every N-th missing item from I")
    p.add_argument("--assemble", action="store_true", help="evaluate nothing, write the table")
    p.add_argument("--out", default=None, help="table JSON (default: the package asset)")
    p.add_argument(
        "--work", default=None, help="folder of resumable logs (default /tmp/hcomposer-tabular)"
    )
    return p.parse_args(argv)


def _shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    i, _, n = text.partition("/")
    i, n = int(i), int(n)
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text!r}: write I/N with 0 <= I < N")
    return i, n


# Proxy config fields added after tables were started, at the value that reproduces the
# behaviour from before they existed: left out of the fingerprint at that value, so that an
# old table's logs still resume (pass them with --proxy-config to keep building it).
LEGACY_NEUTRAL = {"restarts": 0, "task_batch_sizes": []}


def _key(config: dict) -> str:
    """Fingerprint of everything but the seeds: adding a seed later reuses the log."""
    proxy = {
        k: v
        for k, v in config.get("proxy_config", {}).items()
        if not (k in LEGACY_NEUTRAL and v == LEGACY_NEUTRAL[k])
    }
    config = {**config, "proxy_config": proxy}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _read_logs(work: Path, key: str) -> dict[tuple[str, int], dict]:
    from hcomposer.io import read_jsonl

    done: dict[tuple[str, int], dict] = {}
    for log in sorted(work.glob("*.jsonl")):
        for r in read_jsonl(log):
            if r.get("key") == key:
                done[(r["pattern"], int(r["seed"]))] = r
    return done


def _assemble(args, config, patterns, seeds, done, out: Path, argv: list[str]) -> None:
    from hcomposer.io import atomic_write_json, git_revision
    from hcomposer.search.tabular import Table

    per_seed = {p: {str(s): done[(p, s)]["score"] for s in seeds} for p in patterns}
    tasks: dict[str, dict] = {}
    for p in patterns:
        names = done[(p, seeds[0])]["tasks"]
        tasks[p] = {
            t: round(statistics_mean([done[(p, s)]["tasks"][t]["accuracy"] for s in seeds]), 6)
            for t in names
        }
    table = Table(
        name=args.name,
        choices=tuple(args.choices),
        positions=args.positions,
        scores={p: statistics_mean(list(v.values())) for p, v in per_seed.items()},
    )
    wall = [done[(p, s)]["wall_seconds"] for p in patterns for s in seeds]
    hosts = sorted({done[(p, s)].get("host", "?") for p in patterns for s in seeds})
    doc = {
        **table.to_dict(),
        "score": (
            f"mean over seeds {seeds} of evaluate_proxy(pattern @ {args.shape}, "
            f"{args.proxy!r}).score: mean best held-out accuracy over the tasks; higher is better"
        ),
        "config": config,
        "seeds": seeds,
        # The rebuild command: the same configuration, without the sharding/assembly flags.
        "command": "python " + shlex.join(["benchmarks/build_tabular.py", *_config_args(argv)]),
        "evaluations": len(wall),
        "evaluation_seconds_total": round(sum(wall), 1),
        "evaluation_seconds_mean": round(sum(wall) / len(wall), 2),
        "hosts": hosts,
        "git_revision": git_revision(),
        "per_seed": per_seed,
        "task_accuracy": tasks,
        # Every seed's per-task accuracy, so the noise of each task can be read back.
        "task_accuracy_per_seed": {
            p: {
                str(s): {t: round(v["accuracy"], 6) for t, v in done[(p, s)]["tasks"].items()}
                for s in seeds
            }
            for p in patterns
        },
        "params_total": {p: done[(p, seeds[0])]["params_total"] for p in patterns},
    }
    atomic_write_json(out, doc)


def _config_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--shard", "--work", "--out"):
            skip = True
        elif a != "--assemble" and not a.startswith(("--shard=", "--work=", "--out=")):
            out.append(a)
    return out


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    import torch

    from hcomposer.architecture import Architecture
    from hcomposer.io import append_jsonl
    from hcomposer.proxies.proxy import evaluate_proxy
    from hcomposer.proxies.proxy_config import ProxyConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    changes = json.loads(args.proxy_config) if args.proxy_config else {}
    proxy_config = ProxyConfig.from_dict({**ProxyConfig().to_dict(), **changes, "seed": 0})
    out = (
        Path(args.out) if args.out else ROOT / "src/hcomposer/assets/tabular" / f"{args.name}.json"
    )
    work = Path(args.work) if args.work else Path("/tmp/hcomposer-tabular")
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "choices": list(args.choices),
        "positions": args.positions,
        "proxy": args.proxy,
        "proxy_config": proxy_config.to_dict(),
        "shape": args.shape,
    }
    key = _key(config)
    patterns = ["".join(p) for p in itertools.product(args.choices, repeat=args.positions)]
    done = _read_logs(work, key)
    # Seed-major order: a partial build has whole seeds first.
    todo = [(p, s) for s in seeds for p in patterns if (p, s) not in done]
    index, count = _shard(args.shard)
    mine = [] if args.assemble else todo[index::count]
    log = work / (f"{args.name}-{key}-{index}of{count}.jsonl")
    print(
        f"{args.name}: {len(patterns)} patterns x {len(seeds)} seeds, {len(done)} done, "
        f"{len(todo)} missing, {len(mine)} for this process; log {log}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    for i, (pattern, seed) in enumerate(mine, 1):
        arch = Architecture.parse(pattern, shape=args.shape)
        res = evaluate_proxy(arch, args.proxy, seed=seed, config=proxy_config)
        d = res.to_dict()
        record = {
            "key": key,
            "pattern": pattern,
            "seed": seed,
            "score": float(res.score),
            "tasks": {
                t: {"accuracy": v["accuracy"], "loss": v["loss"]} for t, v in d["tasks"].items()
            },
            "params_total": res.params_total,
            "wall_seconds": round(res.wall_seconds, 2),
            "failures": d["failures"],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "host": f"{platform.node()} ({os.cpu_count()} cpus)",
        }
        append_jsonl(log, record)
        done[(pattern, seed)] = record
        eta = (time.perf_counter() - start) / i * (len(mine) - i)
        print(
            f"[{i}/{len(mine)}] {pattern} seed {seed}: score {res.score:.4f} "
            f"({res.wall_seconds:.1f} s; eta {eta / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )
    if count > 1 and not args.assemble:
        return 0
    done = _read_logs(work, key)
    missing = [(p, s) for s in seeds for p in patterns if (p, s) not in done]
    if missing:
        print(f"{len(missing)} evaluations missing: table not written", file=sys.stderr)
        return 1
    _assemble(args, config, patterns, seeds, done, out, argv)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
