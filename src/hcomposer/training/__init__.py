"""The one training core: step, schedule, trainer, distributed, checkpoint.

``train(arch, TrainConfig(...), out_dir)`` runs (or resumes) a training run into a run folder
(``hcomposer.runs.RunDir``); ``hcomposer.training.step`` holds the parameter groups, the autocast
rule, the train step and the evaluation loop that the proxies and the efficiency suite share.
"""

from hcomposer.training import trainer
from hcomposer.training.objective import Objective
from hcomposer.training.trainer import (  # noqa: F401  (re-exported)
    TrainConfig,
    Trainer,
    TrainResult,
    load_run,
    resolve_arch,
    train,
    vocab_for,
)

# The package's public names: the trainer's and the training objective.
__all__ = ["Objective", *trainer.__all__]
