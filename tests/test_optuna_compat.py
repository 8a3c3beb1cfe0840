"""The Optuna private names hcomposer relies on still exist and still mean the same.

When this fails after an Optuna upgrade, fix ``hcomposer.search.optuna_compat`` (the only
module that touches them) before anything else: resume, reseeding and dead-worker
recovery depend on it.
"""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.samplers import GPSampler, TPESampler

from hcomposer.search import optuna_compat as compat
from hcomposer.search.samplers import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_storage_and_trial_ids(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_interval=60, grace_period=120
    )
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    tid = compat.trial_id(trial)
    # Optuna may wrap the storage (a cache in front of the database): same trials either way.
    assert compat.storage_of(study).get_trial(tid).number == trial.number
    assert storage.get_trial(tid).number == trial.number
    frozen = study.get_trials(deepcopy=False)[0]
    assert compat.trial_id(frozen) == tid
    with compat.heartbeat(study, trial):
        pass
    # A fresh heartbeat is not stale; the call itself must work against this Optuna.
    assert compat.stale_trial_ids(study) == []


def test_storage_backend_study_id_and_journal_file(tmp_path):
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=rdb)
    # Optuna wraps an RDB storage in a cache; the backend is the RDBStorage, with its engine.
    assert compat.storage_backend(study) is rdb
    assert compat.study_id(study) == rdb.get_study_id_from_name(study.study_name)
    assert compat.journal_file(compat.storage_of(study)) is None
    path = tmp_path / "journal.log"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    jstudy = optuna.create_study(storage=journal)
    assert compat.journal_file(compat.storage_of(jstudy)) == str(path)
    assert compat.study_id(jstudy) == journal.get_study_id_from_name(jstudy.study_name)
    assert compat.journal_file(compat.storage_of(optuna.create_study())) is None


def test_stale_trials_are_found(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    storage.record_heartbeat(compat.trial_id(trial))
    time.sleep(2.5)
    assert compat.stale_trial_ids(study) == [compat.trial_id(trial)]
    in_memory = optuna.create_study()
    in_memory.ask()
    assert compat.stale_trial_ids(in_memory) == []


@pytest.mark.parametrize("cls", [TPESampler, GPSampler])
def test_random_states_and_gp_cache(cls):
    sampler = cls(seed=0)
    states = [v for v in vars(sampler).values() if isinstance(v, compat.LazyRandomState)]
    states += [
        s
        for v in vars(sampler).values()
        if isinstance(v, optuna.samplers.BaseSampler)
        for s in vars(v).values()
        if isinstance(s, compat.LazyRandomState)
    ]
    assert states, f"{cls.__name__} holds no LazyRandomState any more"
    states[0].rng.seed(1)
    a = states[0].rng.random()
    states[0].rng.seed(1)
    assert states[0].rng.random() == a
    if cls is GPSampler:
        assert hasattr(sampler, "_gprs_cache_list")
        assert hasattr(sampler, "_constraints_gprs_cache_list")
        sampler._gprs_cache_list = ["warm"]
        compat.forget_gp_cache(sampler)
        assert sampler._gprs_cache_list is None


def test_every_sampler_wraps():
    # TrialSeededSampler raises when it finds no random state to reseed.
    for name in ("random", "tpe", "gp", "evolution"):
        for n_objectives in (1, 2):
            make_sampler(name, seed=0, n_objectives=n_objectives)


def test_the_storage_calls_a_reconnecting_storage_wraps_are_the_ones_optuna_makes():
    """Optuna's cache calls these private methods of the RDB storage directly: each exists,
    and each private method the cache calls is in the list (a new one would bypass the
    retries of ``hcomposer.search.reconnect``)."""
    import inspect
    import logging
    import re

    from optuna.storages import _cached_storage
    from optuna.storages._rdb import storage as rdb

    for name in compat.BACKEND_CALLS:
        assert callable(getattr(optuna.storages.RDBStorage, name)), name
    called = set(re.findall(r"self\._backend\.(_[a-z_]+)\(", inspect.getsource(_cached_storage)))
    assert called <= set(compat.BACKEND_CALLS), called - set(compat.BACKEND_CALLS)
    assert rdb._logger is logging.getLogger(compat.RDB_LOGGER)
