"""Stage ``search`` (the Optuna search on the proxy) and ``rescore`` (its top patterns on extra
proxy seeds)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from hcomposer.architecture import Architecture
from hcomposer.pipeline.state import State, mean_std
from hcomposer.recipes import Recipe
from hcomposer.search import load_trials, run_search
from hcomposer.search.objectives import normalise_result, resolve_objective

__all__ = ["stage_search", "top_patterns", "rescore", "stage_rescore"]


def stage_search(state: State, recipe: Recipe, progress: bool, report_to=()) -> dict:
    result = run_search(
        recipe.search, state.dir.search.root, progress=progress, report_to=report_to
    )
    keep = ("number", "pattern", "score")
    best = result.best
    if isinstance(best, dict):
        best = {k: best.get(k) for k in keep}
    elif isinstance(best, list):  # two objectives: the Pareto front
        best = [{k: b.get(k) for k in keep} for b in best]
    return state.finish("search", {"best": best, "n_trials": len(result.trials)})


def top_patterns(trials: list[dict], n: int) -> list[dict]:
    done = sorted(
        (t for t in trials if t.get("state") == "COMPLETE" and t.get("score") is not None),
        key=lambda t: (-t["score"], t["number"]),
    )
    top: dict[str, dict] = {}
    for t in done:
        top.setdefault(t["pattern"], t)
    return list(top.values())[:n]


def _rescore_one(objective, pattern: str, shape, proxy: str, seed: int) -> float:
    """One re-scoring evaluation (module level: it runs in a spawned process too)."""
    arch = Architecture(pattern=pattern, shape=shape)
    return normalise_result(objective(arch, proxy=proxy, seed=seed)).score


def rescore(objective, cfg, jobs: list[tuple[str, int]]) -> Iterator[tuple[str, int, float]]:
    """Score each ``(pattern, seed)`` of ``jobs`` with ``objective`` at the search config
    ``cfg``'s proxy and shape; yield ``(pattern, seed, score)`` as each evaluation ends. They
    run in this process, or in ``cfg.workers`` spawned processes (like the search's workers:
    one proxy thread each)."""
    if cfg.workers <= 1 or len(jobs) <= 1:
        for pattern, seed in jobs:
            yield pattern, seed, _rescore_one(objective, pattern, cfg.shape, cfg.proxy, seed)
        return
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(jobs)), mp_context=ctx) as pool:
        futures = {
            pool.submit(_rescore_one, objective, pattern, cfg.shape, cfg.proxy, seed): (
                pattern,
                seed,
            )
            for pattern, seed in jobs
        }
        for fut in as_completed(futures):
            yield (*futures[fut], fut.result())


def stage_rescore(state: State, recipe: Recipe) -> dict:
    """The search's top patterns on extra proxy seeds; each evaluation saved as it ends, so
    a rerun only runs the missing ones."""
    cfg = recipe.search
    objective = resolve_objective(cfg.proxy, None, cfg.proxy_config)
    saved = state.dir.read_rescore()
    top = top_patterns(load_trials(state.dir.search.root), recipe.rescore_top)
    for t in top:
        saved.setdefault(t["pattern"], {str(cfg.seed): t["score"]})
    extra = [cfg.seed + k for k in range(1, recipe.rescore_seeds + 1)]
    jobs = [(t["pattern"], s) for t in top for s in extra if str(s) not in saved[t["pattern"]]]
    for pattern, seed, score in rescore(objective, cfg, jobs):
        saved[pattern][str(seed)] = score
        state.dir.write_rescore(saved)
    rows = []
    for t in top:
        scores = dict(sorted(saved[t["pattern"]].items(), key=lambda kv: int(kv[0])))
        mean, std = mean_std([float(v) for v in scores.values()])
        rows.append({"pattern": t["pattern"], "scores": scores, "mean": mean, "std": std})
    state.dir.write_rescore(saved)
    return state.finish("rescore", {"top": rows})
