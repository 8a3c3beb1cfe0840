"""Stage ``eval_<role>``: the evaluation suite on a trained model."""

from __future__ import annotations

from hcomposer.evaluation.suite import run_suite
from hcomposer.pipeline.state import State
from hcomposer.recipes import Recipe

__all__ = ["stage_eval"]


def stage_eval(state: State, recipe: Recipe, role: str, argv, progress: bool) -> dict:
    res = run_suite(state.dir.train(role).root, ",".join(recipe.eval.suites),
                    options=recipe.eval.options(), argv=argv, progress=progress,
                    include_path=recipe.eval.lm_eval_include)  # fmt: skip
    parts = res.get("parts", {})
    brief = {
        "loss": (parts.get("loss") or {}).get("loss"),
        "niah": (parts.get("niah") or {}).get("accuracy_mean"),
    }
    return state.finish(f"eval_{role}", brief)
