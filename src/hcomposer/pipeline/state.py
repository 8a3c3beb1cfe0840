"""The run folder's ``pipeline.json``: the recipe and what each finished stage produced; helpers
the stages share."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from hcomposer.config_io import DamagedFolder, read_run_file, stamp
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json
from hcomposer.recipes import Recipe
from hcomposer.runs import HOLDER, PipelineDir

__all__ = ["State", "mean_std", "fmt_pm"]


class State:
    """pipeline.json: the recipe and what each finished stage produced."""

    def __init__(self, out: Path, recipe: Recipe, argv: list[str] | None):
        self.dir = PipelineDir(out)
        self.path = self.dir.state
        self.out = out
        if self.path.exists():
            data = read_run_file(out, self.path.name, keys=("recipe", "stages"), versioned=True)
            if not isinstance(data["stages"], dict):
                raise DamagedFolder(
                    f"run folder {str(out)!r} is damaged: pipeline.json 'stages' is not an "
                    "object; restore it from a copy, or start again with a new --out"
                )
            try:
                same = Recipe.from_dict(data["recipe"]) == recipe
            except (KeyError, TypeError, ValueError, UserError):
                same = False
            if not same:
                raise UserError(
                    f"{out} holds a run of another configuration (recipe "
                    f"{data.get('recipe', {}).get('name')!r}); choose a new --out or delete it"
                )
            self.data = data
        else:
            if out.exists() and any(p.name != HOLDER for p in out.iterdir()):
                raise UserError(
                    f"{out} exists and is not an hcomposer run folder; choose a new --out"
                )
            self.data = {"recipe": recipe.to_dict(), "stages": {}}
            out.mkdir(parents=True, exist_ok=True)
            self.dir.record(recipe.to_dict(), argv)
            self.save()

    def done(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, result: dict) -> dict:
        self.data["stages"][stage] = {**result, "finished": time.time()}
        self.save()
        return result

    def save(self) -> None:
        atomic_write_json(self.path, stamp(self.data))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    # One value has no seed std (None, so that the JSON files stay standard JSON).
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_pm(mean: float, std: float | None, digits: int = 4) -> str:
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
