"""hcomposer aggregate: one pattern from a finished (or running) search folder."""

from __future__ import annotations

import json
from pathlib import Path

from hcomposer.commands.options import add_output
from hcomposer.errors import UserError
from hcomposer.format import console
from hcomposer.io import read_jsonl
from hcomposer.recipes import Recipe
from hcomposer.runs import SearchDir
from hcomposer.scaling.aggregate import aggregate_details
from hcomposer.search import load_trials

HELP = "Aggregate the top trials of a search into one pattern (k-means + per-position vote)."

__all__ = ["HELP", "add_arguments", "run", "read_trials"]


def add_arguments(p) -> None:
    p.add_argument("dir", help="search folder (from 'hcomposer search --out DIR')")
    p.add_argument(
        "--method",
        choices=["n0", "nc", "best"],
        default="n0",
        help="n0: per-position majority vote in the top cluster (default); nc: vote among "
        "candidates agreeing with the previous c chosen positions; best: the best trial",
    )
    p.add_argument("--c", type=int, default=1, help="positions nc conditions on (default 1)")
    p.add_argument("--k", type=int, default=5, help="k-means clusters on the scores (default 5)")
    p.add_argument(
        "--storage",
        default=None,
        help="the study's URL when the search kept it outside DIR (never read from DIR itself)",
    )
    add_output(p, None)


def option_fields() -> dict:
    """argparse dest -> (config class, field): each option is checked against the field."""
    return {"method": (Recipe, "aggregate_method"), "c": (Recipe, "aggregate_c")}


def read_trials(directory: str | Path, storage: str | None = None) -> tuple[list[dict], str]:
    """The trials of a search folder and where they came from.

    The search engine's ``load_trials`` (its Optuna storage) comes first; a plain
    ``trials.jsonl`` (one ``{"pattern", "score", "state"}`` per line) is the fallback.
    """

    path = Path(directory)
    if not path.exists():
        raise UserError(f"search folder {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".jsonl":
        return list(read_jsonl(path)), str(path)
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a search folder (a folder or a trials.jsonl)")
    engine_error = None
    try:
        trials = load_trials(path, storage=storage)
    except UserError as e:
        if storage is not None:
            raise  # the user named the storage: its error is the answer
        engine_error = e
    else:
        if trials:
            return list(trials), "study"
    jsonl = SearchDir(path).trials
    if jsonl.is_file():
        return list(read_jsonl(jsonl)), str(jsonl)
    if engine_error is not None:
        raise engine_error
    raise UserError(
        f"{str(path)!r} holds no search (no study, no trials.jsonl); "
        "run 'hcomposer search --out DIR' first"
    )


def run(args) -> int:
    trials, source = read_trials(args.dir, storage=args.storage)
    result = aggregate_details(trials, method=args.method, c=args.c, k=args.k)
    out = {**result.to_dict(), "source": source}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.table import Table

    con = console()
    con.print(
        f"{result.n_trials} completed trials, {result.n_candidates} distinct patterns; "
        f"k-means on scores -> {len(result.clusters)} clusters, top cluster keeps "
        f"{len(result.kept)} (scores {result.clusters[-1]['min']:.4g} .. "
        f"{result.clusters[-1]['max']:.4g})"
    )
    kept = Table(title="kept candidates (top cluster)")
    kept.add_column("pattern")
    kept.add_column("score", justify="right")
    kept.add_column("trials", justify="right")
    for cand in result.kept:
        kept.add_row(cand.pattern, f"{cand.score:.4f}", str(cand.n_trials))
    con.print(kept)
    if result.votes:
        votes = Table(title=f"votes per position ({result.method})")
        votes.add_column("pos", justify="right")
        votes.add_column("voters", justify="right")
        votes.add_column("votes")
        votes.add_column("choice")
        for v in result.votes:
            shown = ", ".join(
                f"{k}:{n}" for k, n in sorted(v["votes"].items(), key=lambda x: -x[1])
            )
            votes.add_row(str(v["position"]), str(v["voters"]), shown, v["choice"])
        con.print(votes)
    print(result.pattern)
    return 0
