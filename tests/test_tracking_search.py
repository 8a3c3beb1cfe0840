"""--report-to on a search: each trained trial reaches every tracker once, with its score and
pattern (W&B and MLflow through optuna-integration's callbacks), also across a resume."""

from __future__ import annotations

import pytest

import tracking_readers as read
from hcomposer.io import read_json
from hcomposer.search import load_trials, run_search
from hcomposer.search.objectives import synthetic_score
from hcomposer.tracking import BACKENDS
from test_search import small
from test_tracking import isolated  # noqa: F401 - the fixture

for _name in (*BACKENDS, "optuna_integration"):
    pytest.importorskip(_name)


def _tb_texts(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def _mlflow_trials(track, state):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(track / "mlruns").resolve().as_uri())
    parent = state["mlflow"]["run_id"]
    runs = client.search_runs(
        [state["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    return sorted((r.data.tags["pattern"], r.data.metrics["score"]) for r in runs)


def test_search_sends_each_trial_once_across_a_resume(isolated):  # noqa: F811
    out = isolated / "search"
    calls: list[str] = []

    def interrupt_fourth(arch, proxy, seed):
        calls.append(arch.pattern)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {"score": synthetic_score(arch.pattern, seed)}

    with pytest.raises(KeyboardInterrupt):
        run_search(small(), out, objective=interrupt_fourth, progress=False, report_to=BACKENDS)
    run_search(small(), out, objective=interrupt_fourth, progress=False, report_to=BACKENDS)
    done = [t for t in load_trials(out) if t["state"] == "COMPLETE"]
    assert len(done) == 6
    want = sorted((t["pattern"], t["score"]) for t in done)
    track = out / "tracking"
    state = read_json(track / "state.json")
    assert len(state["search_trials"]) == 6

    tb = read.tensorboard_scalars(track / "tensorboard")
    patterns = _tb_texts(track / "tensorboard", "trial/pattern/text_summary")
    assert [s for s, _ in tb["trial/score"]] == [1, 2, 3, 4, 5, 6] == sorted(patterns)
    got = sorted((patterns[s], v) for s, v in tb["trial/score"])
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)

    # MLflow: optuna-integration's MLflowCallback, one child run per trial.
    assert _mlflow_trials(track, state) == want

    # W&B: WeightsAndBiasesCallback's rows (score and the slots) with the pattern beside them,
    # over the two offline folders of the two processes.
    rows = {}
    for run in read.wandb_runs(track / "wandb"):
        assert run["id"] == state["wandb"]["id"]
        rows.update(run["history"])
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert sorted((r["trial/pattern"], r["score"]) for r in rows.values()) == want
    assert all(r["p00"] + r["p01"] + r["p02"] == r["trial/pattern"] for r in rows.values())

    logs, config = read.trackio("hcomposer", state["trackio"]["name"])
    got = sorted((r["trial/pattern"], r["trial/score"]) for r in logs if "trial/score" in r)
    assert got == want
    assert config["search.sampler"] == "random"
