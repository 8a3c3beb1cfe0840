"""The ruler study (``benchmarks/results/ruler_v3``): 48 patterns at scale, each at its own
learning rate, two seeds, losses on a test split. See ``hcomposer.proxies.ruler``.

    python benchmarks/ruler_v3.py split            # once, before any run: dev / held-out
    python benchmarks/ruler_v3.py plan             # parameters, budget, tokens per parameter
    python benchmarks/ruler_v3.py run --shard 0/2  # a worker (resumable; 2 share the folder)
    python benchmarks/ruler_v3.py status           # what is done
    python benchmarks/ruler_v3.py summary          # result.json / result.md from runs.jsonl

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

from hcomposer.format import markdown_table
from hcomposer.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from hcomposer.proxies.ruler import (
    RulerConfig,
    family,
    plan,
    rate_rule_check,
    reliability,
    ruler_losses,
    run_ruler,
    split_patterns,
)
from hcomposer.stats import spearman_ci

OUT = Path(__file__).parent / "results" / "ruler_v3"

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


def trivial_rankers(patterns: list[str], params: dict[str, int]) -> dict[str, dict[str, float]]:
    """Scores a user gets for free (higher = predicted better, i.e. lower loss)."""
    letters = {p: p.replace("[", "").replace("]", "").replace("|", "") for p in patterns}
    return {
        "parameter count": {p: float(params[p]) for p in patterns},
        "has S/D": {p: float(any(c in letters[p] for c in "SD")) for p in patterns},
        "count of S+D": {p: float(sum(c in "SD" for c in letters[p])) for p in patterns},
        "count of A": {p: float(letters[p].count("A")) for p in patterns},
    }


def _rank_against(scores: dict[str, float], losses: dict[str, float]) -> dict | None:
    pats = sorted(set(scores) & set(losses))
    x = [scores[p] for p in pats]
    if len(pats) < 3 or len(set(x)) < 2:
        return None
    rho, lo, hi = spearman_ci(x, [-losses[p] for p in pats])
    return {"spearman": rho, "ci": [lo, hi], "n": len(pats)}


def summarise(out: Path, split: dict, cfg: RulerConfig) -> dict:
    losses = ruler_losses(out)
    params = read_json(out / "plan.json")["non_embedding_active_params"]
    recs = list(read_jsonl(out / "runs.jsonl"))
    chosen = {
        r["pattern"]: r["lr"]
        for r in recs
        if r["role"] == "final" and r["seed"] == 0 and r["flag"] is None
    }
    res: dict = {"config": cfg.to_dict(), "reliability": {}, "trivial": {}}
    for name, pats in (
        ("all", split["dev"] + split["heldout"]),
        ("dev", split["dev"]),
        ("heldout", split["heldout"]),
    ):
        sub = {p: losses[p] for p in pats if p in losses}
        rel = reliability(sub)
        res["reliability"][name] = {k: v for k, v in rel.items() if k != "spread"}
        mean = {p: v["mean"] for p, v in sub.items()}
        res["trivial"][name] = {
            r: _rank_against(sc, mean) for r, sc in trivial_rankers(list(mean), params).items()
        }
        afwe = {p: m for p, m in mean.items() if family(p) == "afwe"}
        res["trivial"][name + " (A/F/W/E only)"] = {
            r: _rank_against(sc, afwe) for r, sc in trivial_rankers(list(afwe), params).items()
        }
    res["rate_rule"] = rate_rule_check(out, split["check"], cfg)
    res["patterns"] = [
        {
            "pattern": p,
            "set": "heldout" if p in split["heldout"] else "dev",
            "lr": chosen.get(p),
            "seeds": losses[p]["seeds"],
            "mean": losses[p]["mean"],
        }
        for p in sorted(losses, key=lambda q: losses[q]["mean"])
    ]
    res["flagged"] = [
        {k: r[k] for k in ("pattern", "lr", "tokens", "seed", "role", "flag")}
        for r in recs
        if r["flag"]
    ]
    res["runs"] = len(recs)
    return res


def _fmt_rho(v: dict | None) -> str:
    return (
        "-"
        if v is None
        else f"{v['spearman']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] (n {v['n']})"
    )


def summary_markdown(res: dict) -> str:
    lines = [
        f"Ruler v3: {res['runs']} runs logged; {len(res['patterns'])} patterns with a test loss.",
        "",
    ]
    rel_rows = []
    for name, r in res["reliability"].items():
        if r.get("seed_spearman") is None:
            rel_rows.append([name, r["n"], "-", "-", "-"])
            continue
        lo, hi = r["seed_spearman_ci"]
        rel_rows.append(
            [
                name,
                r["n"],
                f"{r['seed_spearman']:.3f} [{lo:.2f}, {hi:.2f}]",
                f"{r['spearman_brown']:.3f}",
                f"{r['spread_median']:.4f}",
            ]
        )
    lines += [
        "## The ruler's reliability (seed 0 against seed 1, test loss)",
        "",
        markdown_table(
            [
                "patterns",
                "n",
                "seed-to-seed Spearman",
                "Spearman-Brown (2 seeds)",
                "median seed spread (nats)",
            ],
            rel_rows,
        ),
        "",
    ]
    names = list(next(iter(res["trivial"].values())))
    lines += [
        "## Trivial rankers against the ruler (Spearman, 95% bootstrap interval)",
        "",
        markdown_table(
            ["patterns", *names],
            [[k, *(_fmt_rho(v[n]) for n in names)] for k, v in res["trivial"].items()],
        ),
        "",
    ]
    if res["rate_rule"]:
        lines += [
            "## The cheap rate rule against the full grid (seed 0, full budget)",
            "",
            markdown_table(
                ["pattern", "cheap pick", "full-grid pick", "test cost (nats)"],
                [
                    [f"`{r['pattern']}`", r["cheap_lr"], r["grid_lr"], f"{r['test_cost']:+.4f}"]
                    for r in res["rate_rule"]
                ],
            ),
            "",
        ]
    lines += [
        "## Patterns (test loss, mean of seeds)",
        "",
        markdown_table(
            ["pattern", "set", "rate", "seeds", "mean"],
            [
                [
                    f"`{p['pattern']}`",
                    p["set"],
                    p["lr"],
                    ", ".join(f"{v:.4f}" for v in p["seeds"].values()),
                    f"{p['mean']:.4f}",
                ]
                for p in res["patterns"]
            ],
        ),
        "",
    ]
    if res["flagged"]:
        lines += [
            "Flagged runs (kept in runs.jsonl, never averaged in): "
            + "; ".join(
                f"`{f['pattern']}` lr {f['lr']} seed {f['seed']} ({f['role']}): {f['flag']}"
                for f in res["flagged"]
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["split", "plan", "run", "status", "summary"])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default=None, help="run folders (default OUT/runs, not committed)")
    ap.add_argument("--shard", default="0/1")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cfg = RulerConfig()
    split_path = out / "split.json"
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
        atomic_write_json(out / "plan.json", p)
        print(
            f"median non-embedding active params {p['median']:,.0f}; tokens {p['tokens']:,}; "
            f"{p['tokens_per_median_param']:.2f} tokens per parameter"
        )
        return 0
    if args.what == "status":
        recs = list(read_jsonl(out / "runs.jsonl"))
        finals = {(r["pattern"], r["seed"]) for r in recs if r["role"] == "final" and not r["flag"]}
        done = [p for p in patterns if all((p, s) in finals for s in cfg.seeds)]
        print(f"{len(recs)} runs logged; {len(done)} of {len(patterns)} patterns complete")
        print(f"flagged: {[(r['pattern'], r['lr'], r['flag']) for r in recs if r['flag']]}")
        return 0
    if args.what == "summary":
        res = summarise(out, split, cfg)
        atomic_write_json(out / "result.json", res)
        atomic_write_text(out / "result.md", summary_markdown(res))
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
