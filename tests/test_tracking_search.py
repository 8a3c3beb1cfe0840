"""--report-to beyond train: a search's trials reach every tracker once, with score and pattern
(W&B and MLflow through optuna-integration's callbacks), also across a resume; `run` tracks its
search, its training runs and its report; an IsoFLOP sweep its runs and its fit."""

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


def test_run_pipeline_tracks_search_training_and_report(isolated):  # noqa: F811
    import dataclasses

    from hcomposer.io import read_jsonl
    from hcomposer.pipeline import run_pipeline
    from hcomposer.recipes import EvalConfig
    from test_pipeline import SMOKE

    recipe = dataclasses.replace(
        SMOKE, train_seeds=1, rescore_top=0, eval=EvalConfig(suites=("loss",))
    )
    out = isolated / "pipe"
    names = ("tensorboard", "mlflow")
    state = run_pipeline(recipe, out, progress=False, report_to=names)
    trials = read.tensorboard_scalars(out / "search" / "tracking" / "tensorboard")
    assert len(trials["trial/score"]) == recipe.search.trials
    for role in ("baseline", "composite"):
        run = out / "train" / role
        tb = read.tensorboard_scalars(run / "tracking" / "tensorboard")
        loss = [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]
        assert [s for s, _ in tb["train/loss"]] == [s for s, _ in loss]
        assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in loss], rel=1e-6)
    # The pipeline's own run: the best score and the report's plots.
    track = out / "tracking"
    mine = read_json(track / "state.json")
    params, history, _, figures = read.mlflow_run(track / "mlruns", mine["mlflow"]["run_id"])
    best = state["stages"]["search"]["best"]["score"]
    assert history["search/best_score"] == [(0, pytest.approx(best))]
    assert params["recipe.name"] == "smoke"
    assert {"figures/trials.png", "figures/patterns.png"} <= set(figures)
    images = read.tensorboard_images(track / "tensorboard")
    assert {"report/trials", "report/patterns"} <= images
    # Run again: every stage is done, nothing is logged twice.
    run_pipeline(recipe, out, progress=False, report_to=names)
    _, again, _, figures2 = read.mlflow_run(track / "mlruns", mine["mlflow"]["run_id"])
    assert again["search/best_score"] == history["search/best_score"] and figures2 == figures


@pytest.mark.slow
def test_isoflop_tracks_each_run_and_the_fit_once(isolated):  # noqa: F811
    from hcomposer.data.sources import embedded_corpus_text
    from hcomposer.scaling import run_sweep
    from test_scaling import _tiny

    text = isolated / "austen.txt"
    text.write_text(embedded_corpus_text()[:60_000], encoding="utf-8")
    out = isolated / "sweep"
    names = ("tensorboard", "mlflow")
    results = run_sweep(_tiny(text), out, progress=False, report_to=names)
    losses = [r["loss"] for r in results["runs"]]
    assert len(losses) == 6
    for r in results["runs"]:
        tb = read.tensorboard_scalars(out / r["key"] / "tracking" / "tensorboard")
        assert tb["val/loss"][-1][1] == pytest.approx(r["loss"], rel=1e-6)
    track = out / "tracking"
    run_id = read_json(track / "state.json")["mlflow"]["run_id"]
    params, history, _, figures = read.mlflow_run(track / "mlruns", run_id)
    assert [v for _, v in history["isoflop/loss"]] == pytest.approx(losses)
    assert sorted(figures) == ["figures/frontier.png", "figures/isoflop.png"]
    assert params["sweep.patterns"] == "['AF']"
    # Fitted again over the same runs: nothing new is logged.
    run_sweep(_tiny(text), out, progress=False, report_to=names)
    assert read.mlflow_run(track / "mlruns", run_id)[1] == history


@pytest.mark.slow
def test_proxy_rank_tracks_its_points(isolated, capsys):  # noqa: F811
    import json

    from hcomposer.cli import main

    out = isolated / "rank"
    argv = ["proxy-rank", "--recipe", "smoke", "--out", str(out), "--json"]
    assert main([*argv, "--report-to", "tensorboard"]) == 0
    doc = json.loads(capsys.readouterr().out)
    points = sorted(doc["points"], key=lambda p: p["proxy_score"])
    tb = read.tensorboard_scalars(out / "tracking" / "tensorboard")
    assert [v for _, v in tb["proxy_rank/scale_val_loss"]] == pytest.approx(
        [p["scale_val_loss"] for p in points], rel=1e-6
    )
    assert tb["proxy_rank/spearman"] == [(3, pytest.approx(doc["correlation"]["spearman"]))]
    assert read.tensorboard_images(out / "tracking" / "tensorboard") == {"proxy_rank/plot"}
