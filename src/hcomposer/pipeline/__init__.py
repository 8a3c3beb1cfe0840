"""``hcomposer run``: the Composer pipeline end to end, resumable stage by stage.

    search -> aggregate -> scale -> train composite + baseline -> evaluate -> report

With ``recipe.train_seeds`` > 1 each model is trained again on further seeds (each run its
own folder ``train/<role>-seed<k>``, its own stage) and only its validation loss is measured;
with ``recipe.rescore_top`` > 0 the search's best patterns are scored again on extra proxy
seeds (``rescore.json``, saved after each evaluation; the evaluations run in the search's
``workers`` processes). The report states both seed noises.

Each stage writes its result into the run folder and is marked done in
``pipeline.json``; a rerun skips finished stages and lets the unfinished one
resume itself (the search from its study, training from its last checkpoint).

One module per stage (``search``, ``aggregate``, ``scale``, ``train``, ``evaluate``,
``report``), the shared ``pipeline.json`` record in ``state``, the order in ``run``.
"""

from hcomposer.pipeline.report import (
    NOISE_RULE,
    noise_markdown,
    noise_sentence,
    noise_summary,
    seed_noise,
)
from hcomposer.pipeline.run import run_pipeline
from hcomposer.pipeline.scale import matched_baseline, target_architecture, target_on_meta
from hcomposer.pipeline.search import rescore
from hcomposer.pipeline.state import State

__all__ = [
    "run_pipeline",
    "matched_baseline",
    "target_architecture",
    "target_on_meta",
    "seed_noise",
    "noise_summary",
    "noise_sentence",
    "noise_markdown",
    "NOISE_RULE",
    "rescore",
    "State",
]
