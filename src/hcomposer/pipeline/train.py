"""Stage ``train_<role>`` (and ``train_<role>_seed<k>``): composite and baseline trained on the one
training core."""

from __future__ import annotations

from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError
from hcomposer.evaluation.suite import run_suite
from hcomposer.pipeline.state import State
from hcomposer.recipes import Recipe
from hcomposer.training.trainer import train

__all__ = ["stage_train", "stage_train_seed", "seed_losses"]


def stage_train(
    state: State, recipe: Recipe, role: str, argv, progress: bool, report_to=(), fit=train
) -> dict:
    """``fit``: how the model is trained (``train``'s signature; a rehearsal launches it on
    two processes, see ``hcomposer.pipeline.rehearse``)."""
    arch = Architecture.from_json(state.dir.architecture(role))
    run_dir = state.dir.train(role)
    result = fit(arch, recipe.train, run_dir.root, resume=True, progress=progress, argv=argv,
                 report_to=report_to)  # fmt: skip
    if result.status != "completed":
        raise UserError(
            f"training the {role} {arch.pattern} ended with status {result.status!r} "
            f"({result.message}); see {run_dir.status_json}"
        )
    return state.finish(f"train_{role}", {**result.to_dict(), "pattern": arch.pattern})


def stage_train_seed(
    state: State, recipe: Recipe, role: str, k: int, argv, progress, report_to=(), fit=train
) -> dict:
    arch = Architecture.from_json(state.dir.architecture(role))
    run_dir = state.dir.train(role, k)
    cfg = recipe.train.replace(seed=recipe.train.seed + k)
    result = fit(arch, cfg, run_dir.root, resume=True, progress=progress, argv=argv,
                 report_to=report_to)  # fmt: skip
    if result.status != "completed":
        raise UserError(
            f"training the {role} {arch.pattern} (seed {cfg.seed}) ended with status "
            f"{result.status!r} ({result.message}); see {run_dir.status_json}"
        )
    res = run_suite(run_dir.root, "loss", options=recipe.eval.options(), argv=argv,
                    progress=progress)  # fmt: skip
    loss = ((res.get("parts") or {}).get("loss") or {}).get("loss")
    return state.finish(f"train_{role}_seed{k}", {"seed": cfg.seed, "loss": loss})


def seed_losses(st: dict[str, Any], recipe: Recipe, role: str) -> list[float]:
    losses = [st[f"eval_{role}"]["loss"]]
    losses += [st[f"train_{role}_seed{k}"]["loss"] for k in range(1, recipe.train_seeds)]
    return [float(x) for x in losses if x is not None]
