"""Trials as Ray tasks on a local Ray instance started here (2 CPUs, no dashboard).

- ``--executor ray`` with two workers trains exactly ``--trials`` trials, each pattern
  once, each evaluation in a Ray worker process (not this one);
- a search interrupted under the local executor resumes under Ray: completed trials are
  kept, the interrupted one is run again, the total is exact;
- a task whose worker process dies is retried once by Ray, then the trial fails with
  "ray task lost", and the search goes on.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.executors import LocalExecutor, RayExecutor, make_executor
from hcomposer.search.objectives import synthetic_score

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hcomposer[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    # Ray pickles these test functions by value: its workers cannot import this module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # Ray gives its raylet a fixed 30 s to register; on a loaded machine try again.
    for attempt in range(3):
        try:
            ray.init(
                address="local",  # a fresh instance, even where a cluster is running
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield
    finally:
        ray.shutdown()


def _config(**kw) -> SearchConfig:
    base = dict(
        primitives="AFW",
        layers=3,
        trials=6,
        sampler="tpe",
        n_startup=3,
        shape="tiny",
        proxy="synthetic",
        seed=0,
        workers=2,
    )
    base.update(kw)
    return SearchConfig(**base)


def scored_where(arch, proxy, seed):
    """Score, and the pid of the process that computed it."""
    return {"score": synthetic_score(arch.pattern, seed), "pid": os.getpid()}


def interrupt_after(calls: list, n: int):
    def objective(arch, proxy, seed):
        calls.append(arch.pattern)
        if len(calls) > n:
            raise KeyboardInterrupt
        return {"score": synthetic_score(arch.pattern, seed)}

    return objective


def dies_on_f(arch, proxy, seed, *, log_dir):
    """Kill the evaluating process for patterns starting with F (after logging the try)."""
    with open(Path(log_dir) / arch.pattern, "a") as f:
        f.write(f"{os.getpid()}\n")
    if arch.pattern.startswith("F"):
        os._exit(1)
    return {"score": synthetic_score(arch.pattern, seed)}


def _exact(trials, n):
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == n
    assert len({t["pattern"] for t in done}) == n
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]
    return done


def test_exact_count_with_ray_tasks(local_ray, tmp_path):
    result = run_search(
        _config(), tmp_path / "r", objective=scored_where, executor=RayExecutor(), progress=False
    )
    done = _exact(load_trials(tmp_path / "r"), 6)
    pids = {t["proxy_result"]["pid"] for t in done}
    assert os.getpid() not in pids  # evaluated in Ray workers
    for t in done:
        assert t["score"] == pytest.approx(synthetic_score(t["pattern"], 0))
    assert result.best["score"] == max(t["score"] for t in done)


def test_resume_local_search_under_ray(local_ray, tmp_path):
    out = tmp_path / "r"
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(workers=1), out, objective=interrupt_after(calls, 3), progress=False)
    before = {t["number"]: t for t in load_trials(out)}
    kept = {n: t for n, t in before.items() if t["state"] == "COMPLETE"}
    assert len(kept) == 3
    interrupted = [t for t in before.values() if t["failure"] == "interrupted"]
    assert len(interrupted) == 1

    run_search(_config(), out, objective=scored_where, executor=RayExecutor(), progress=False)
    after = load_trials(out)
    _exact(after, 6)
    by_number = {t["number"]: t for t in after}
    for n, t in kept.items():
        assert by_number[n]["finished"] == t["finished"]
    retry = [t for t in after if t["retry_of"] == interrupted[0]["number"]]
    assert len(retry) == 1 and retry[0]["state"] in ("COMPLETE", "CACHED")
    # And back to the local executor: the finished search has nothing left to do.
    run_search(_config(), out, objective=scored_where, executor=LocalExecutor(), progress=False)
    assert load_trials(out) == after


def test_lost_task_is_retried_once_then_failed(local_ray, tmp_path):
    logs = tmp_path / "tries"
    logs.mkdir()
    config = _config(primitives="AF", trials=3, sampler="random", workers=1)
    objective = functools.partial(dies_on_f, log_dir=str(logs))
    run_search(config, tmp_path / "r", objective=objective, executor=RayExecutor(), progress=False)
    trials = load_trials(tmp_path / "r")
    _exact(trials, 3)
    lost = [t for t in trials if t["state"] == "FAIL" and t["pattern"].startswith("F")]
    lost = [t for t in lost if "ray task lost" in (t["failure"] or "")]
    assert lost, [(t["pattern"], t["state"], t["failure"]) for t in trials]
    for t in lost:
        tries = (logs / t["pattern"]).read_text().split()
        assert len(tries) == 2 and len(set(tries)) == 2  # one retry, in a fresh worker


def test_executor_options_are_checked():
    from hcomposer.errors import UserError

    with pytest.raises(UserError, match="not known"):
        make_executor("dask")
    with pytest.raises(UserError, match="only apply with --executor ray"):
        make_executor("local", cpus_per_trial=2)
    with pytest.raises(UserError, match="cpus-per-trial"):
        make_executor("ray", cpus_per_trial=0)
