"""A Ray node lost in the middle of a search (not one task: the node with its raylet and
every worker on it), on a two-node cluster started in this process
(``ray.cluster_utils.Cluster``: a head and a worker node, one CPU each).

The trial whose evaluation ran on the lost node is retried by Ray on the node left, the
search finishes with exactly ``--trials`` trained trials, each pattern once, and nothing is
counted twice.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from hcomposer.search import SearchConfig, load_trials, run_search
from hcomposer.search.executors import RayExecutor
from hcomposer.search.objectives import synthetic_score

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hcomposer[ray]')")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.slow

# Seconds each evaluation takes: long enough to lose the node in the middle of one.
SLOW = 3.0


@pytest.fixture(scope="module")
def two_nodes():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # A node is declared dead after ~1.5 s without a health check (not Ray's default ~30 s).
    health = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 3,
    }
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": health},
    )
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def logged_slow_score(arch, proxy, seed, *, log_dir):
    """Log (pattern, node, pid) when the evaluation starts, then take SLOW seconds."""
    node = ray.get_runtime_context().get_node_id()
    with open(Path(log_dir) / f"{arch.pattern}.{os.getpid()}", "w") as f:
        f.write(node)
    time.sleep(SLOW)
    return {"score": synthetic_score(arch.pattern, seed)}


def test_a_node_lost_mid_search_is_survived_and_nothing_counted_twice(two_nodes, tmp_path):
    import functools

    cluster, worker = two_nodes
    logs = tmp_path / "tries"
    logs.mkdir()
    config = SearchConfig(
        primitives="AF", layers=3, trials=4, sampler="random", shape="tiny",
        proxy="synthetic", seed=0, workers=2,
    )  # fmt: skip
    objective = functools.partial(logged_slow_score, log_dir=str(logs))
    outcome: dict = {}

    def search() -> None:
        try:
            outcome["result"] = run_search(
                config, tmp_path / "r", objective=objective, executor=RayExecutor(), progress=False
            )
        except BaseException as e:  # re-raised in the test's thread below
            outcome["error"] = e

    thread = threading.Thread(target=search, daemon=True)
    thread.start()
    doomed = worker.node_id
    deadline = time.time() + 120
    while not [p for p in logs.iterdir() if p.read_text() == doomed]:
        assert thread.is_alive(), (doomed, {p.name: p.read_text() for p in logs.iterdir()})
        assert time.time() < deadline, "no evaluation ever ran on the worker node"
        time.sleep(0.1)
    lost = next(p for p in logs.iterdir() if p.read_text() == doomed).name.split(".")[0]
    # Every process of the node at once: its raylet and the worker evaluating `lost`.
    cluster.remove_node(worker, allow_graceful=False)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the search did not finish"
    assert "error" not in outcome, outcome.get("error")

    trials = load_trials(tmp_path / "r")
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(done) == 4 and len({t["pattern"] for t in done}) == 4
    assert not [t for t in trials if t["state"] in ("FAIL", "RUNNING", "WAITING")], trials
    # The evaluation lost with the node ran again elsewhere, and its trial counts once.
    tries = {
        p.name.split(".")[1]: p.read_text() for p in logs.iterdir() if p.name.split(".")[0] == lost
    }
    assert len(tries) == 2 and doomed in tries.values(), tries
    assert {n for n in tries.values() if n != doomed}, tries
    assert [t["pattern"] for t in done].count(lost) == 1
    assert outcome["result"].best["score"] == max(t["score"] for t in done)
