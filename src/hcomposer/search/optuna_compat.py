"""Every use of Optuna's private API, in one place (``tests/test_optuna_compat.py`` checks each).

Optuna has no public way to do these; an upgrade that renames one fails that test loudly
instead of silently breaking resume, reseeding or dead-worker recovery.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

__all__ = [
    "LazyRandomState",
    "storage_of",
    "storage_backend",
    "journal_file",
    "study_id",
    "trial_id",
    "heartbeat",
    "stale_trial_ids",
    "forget_gp_cache",
    "BACKEND_CALLS",
    "RDB_LOGGER",
]

# The private methods of ``RDBStorage`` that Optuna's cache in front of it (``_CachedStorage``)
# and the heartbeat call directly: a storage that wraps every call (``search.reconnect``)
# must wrap these too.
BACKEND_CALLS = (
    "_create_new_trial",
    "_get_best_trial_id",
    "_get_trials",
    "_set_trial_param",
    "_get_stale_trial_ids",
)
# The logger of ``RDBStorage``'s module (it logs a lost connection as a query-size warning).
RDB_LOGGER = "optuna.storages._rdb.storage"


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes."""
    return study._storage


def storage_backend(study: optuna.Study) -> Any:
    """The object one level under the study's storage, or the storage when there is none:
    the ``RDBStorage`` under Optuna's cache wrapper, the file backend under a ``JournalStorage``."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def journal_file(storage: Any) -> str | None:
    """The log file of a ``JournalStorage`` with a file backend; None for any other object."""
    return getattr(getattr(storage, "_backend", None), "_file_path", None)


def study_id(study: optuna.Study) -> int:
    """A study's id in its storage (not its name)."""
    return study._study_id


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's id in its storage (not its number in the study)."""
    return trial._trial_id


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> AbstractContextManager:
    """A thread recording the trial's heartbeat while it runs (RDB storages with a heartbeat)."""
    return get_heartbeat_thread(trial._trial_id, study._storage)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of RUNNING trials whose heartbeat stopped; [] when the storage keeps none."""
    storage = study._storage
    if not hasattr(storage, "_get_stale_trial_ids") or not is_heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(study._study_id))


def forget_gp_cache(sampler: Any) -> None:
    """Drop the GP sampler's warm start of kernel parameters, so that a proposal depends on
    the trial log only (not on which fits this process ran before)."""
    if hasattr(sampler, "_gprs_cache_list"):
        sampler._gprs_cache_list = None
        sampler._constraints_gprs_cache_list = None
