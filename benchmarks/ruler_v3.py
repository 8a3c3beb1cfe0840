"""The ruler study (``benchmarks/results/ruler_v3``): 48 patterns at scale, each at its own
learning rate, two seeds, losses on a test split. See ``hcomposer.proxies.ruler``.

    python benchmarks/ruler_v3.py split            # once, before any run: dev / held-out
    python benchmarks/ruler_v3.py plan             # parameters, budget, tokens per parameter
    python benchmarks/ruler_v3.py run --shard 0/2  # a worker (resumable; 2 share the folder)
    python benchmarks/ruler_v3.py status           # what is done
    python benchmarks/ruler_v3.py summary          # result.json / result.md from runs.jsonl
    python benchmarks/ruler_v3.py proxies --shard 0/2   # the zoo's proxy scores (resumable)
    python benchmarks/ruler_v3.py zoo              # zoo.json / zoo.md / zoo.png (no training)
    python benchmarks/ruler_v3.py seed --shard 0/2 # seed 2 where seeds 0 and 1 differ > 0.1
    python benchmarks/ruler_v3.py bytes --shard 0/2  # the byte-level check on 10 dev patterns

Order of work: the five ``check`` patterns first (the cheap rate rule against the full grid),
then the rest alternating held-out and development patterns, so any prefix of the study is
balanced between the two.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hcomposer.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from hcomposer.proxies.ruler import (
    RulerConfig,
    family,
    plan,
    run_ruler,
    split_patterns,
)
from hcomposer.proxies.ruler_study import (
    add_seed,
    run_byte_check,
    run_proxies,
    summarise,
    summary_markdown,
    write_zoo,
)
from hcomposer.runs import RulerDir

OUT = Path(__file__).parent / "results" / "ruler_v3"
# A third seed where the first two differ by more than this (nats of test loss), fixed on
# 2026-12-07 from the first 7 patterns (median spread 0.06, widest 0.23), before any held-out
# pattern's second seed was known to exceed it.
SPREAD = 0.1

# Made of A/F/W/E only (28): the trivial has-S/D rules cannot rank these.
AFWE = [
    "AAAAAA",
    "AAAAAF",
    "AAAFFF",
    "AAFFFF",
    "AFAFAF",
    "AFAFFF",
    "AFFAFF",
    "AFFFFF",
    "FAAAAA",
    "FAFAFA",
    "FFAAFF",
    "FFFAAA",
    "FFFFAF",
    "FFFFFA",
    "FFFFFF",
    "FAAFFA",
    "AEAEAE",
    "WFWFWF",
    "FAAAFF",
    "FAFAFF",
    "WFAFWF",
    "WWWFFF",
    "WEWEWE",
    "AEFAEF",
    "EEEEEE",
    "[A|W]F[A|W]F[A|W]F",
    "FFAFFA",
    "AWFAWF",
]
# With a Mamba-2 (S) or gated DeltaNet (D) layer (20).
SD = [
    "SFSFSF",
    "FSFSFS",
    "SSSSSS",
    "SSSFFF",
    "SFFFFF",
    "AFSAFS",
    "SSFFAA",
    "AASSFF",
    "DFDFDF",
    "FDFDFD",
    "ADADAD",
    "[A|S]F[A|S]F[A|S]F",
    "DDDDDD",
    "DFAFDF",
    "[A|D]F[A|D]F[A|D]F",
    "SFAFSF",
    "DEDEDE",
    "WFSFWF",
    "SDFSDF",
    "AFDFFF",
]
SPLIT_SEED = 20261207


def make_split() -> dict:
    split = split_patterns(AFWE + SD, heldout_afwe=14, heldout_sd=8, seed=SPLIT_SEED)
    rng = np.random.default_rng(SPLIT_SEED + 1)
    dev_afwe = [p for p in split["dev"] if family(p) == "afwe"]
    dev_sd = [p for p in split["dev"] if family(p) == "sd"]
    check = [dev_afwe[i] for i in sorted(rng.choice(len(dev_afwe), 3, replace=False))] + [
        dev_sd[i] for i in sorted(rng.choice(len(dev_sd), 2, replace=False))
    ]
    return {**split, "check": check, "seed": SPLIT_SEED}


def byte_check_patterns(split: dict) -> list[str]:
    """The byte-level check's 10 patterns, all from the development set (a design question):
    the five check patterns and five more drawn with the study's seed. Fixed 2026-12-07
    before any byte-level run."""
    rng = np.random.default_rng(SPLIT_SEED + 2)
    rest = [p for p in split["dev"] if p not in split["check"]]
    return list(split["check"]) + [rest[i] for i in sorted(rng.choice(len(rest), 5, replace=False))]


def order(split: dict) -> list[str]:
    rest_h = [p for p in split["heldout"]]
    rest_d = [p for p in split["dev"] if p not in split["check"]]
    out = list(split["check"])
    while rest_h or rest_d:
        if rest_h:
            out.append(rest_h.pop(0))
        if rest_d:
            out.append(rest_d.pop(0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ["split", "plan", "run", "status", "summary", "proxies", "zoo", "seed", "bytes"]
    ap.add_argument("what", choices=what)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default=None, help="run folders (default OUT/runs, not committed)")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--seed", type=int, default=2, help="seed: which extra seed to add")
    ap.add_argument(
        "--spread", type=float, default=SPREAD, help="seed: add it where seeds 0 and 1 differ more"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    cfg = RulerConfig()
    split_path = RulerDir(out).split
    if args.what == "split":
        split = make_split()
        if split_path.is_file() and read_json(split_path) != split:
            print(f"{split_path} exists with another split; it is never rewritten", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(split_path, split)
        print(json.dumps(split, indent=1))
        return 0
    if not split_path.is_file():
        print(f"{split_path} is missing: run `split` first", file=sys.stderr)
        return 2
    split = read_json(split_path)
    patterns = order(split)
    if args.what == "plan":
        p = plan(patterns, cfg)
        atomic_write_json(RulerDir(out).plan, p)
        print(
            f"median non-embedding active params {p['median']:,.0f}; tokens {p['tokens']:,}; "
            f"{p['tokens_per_median_param']:.2f} tokens per parameter"
        )
        return 0
    if args.what == "status":
        recs = list(read_jsonl(RulerDir(out).runs))
        finals = {(r["pattern"], r["seed"]) for r in recs if r["role"] == "final" and not r["flag"]}
        done = [p for p in patterns if all((p, s) in finals for s in cfg.seeds)]
        print(f"{len(recs)} runs logged; {len(done)} of {len(patterns)} patterns complete")
        print(f"flagged: {[(r['pattern'], r['lr'], r['flag']) for r in recs if r['flag']]}")
        return 0
    if args.what == "proxies":
        i, n = (int(v) for v in args.shard.split("/"))
        run_proxies(out, patterns, cfg, (i, n), args.work)
        return 0
    if args.what == "zoo":
        print(write_zoo(out, split, cfg))
        return 0
    if args.what == "seed":
        i, n = (int(v) for v in args.shard.split("/"))
        add_seed(out, cfg, args.seed, above=args.spread, shard=(i, n), work_dir=args.work,
                 log=lambda m: print(m, flush=True))  # fmt: skip
        return 0
    if args.what == "bytes":
        i, n = (int(v) for v in args.shard.split("/"))
        run_byte_check(out, byte_check_patterns(split), cfg, shard=(i, n), work_dir=args.work,
                       log=lambda m: print(m, flush=True))  # fmt: skip
        return 0
    if args.what == "summary":
        res = summarise(out, split, cfg)
        atomic_write_json(RulerDir(out).result_json, res)
        atomic_write_text(RulerDir(out).result_md, summary_markdown(res))
        print(summary_markdown(res))
        return 0
    i, n = (int(v) for v in args.shard.split("/"))
    run_ruler(
        out,
        patterns,
        cfg,
        check_patterns=tuple(split["check"]),
        shard=(i, n),
        work_dir=args.work,
        log=lambda m: print(m, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
