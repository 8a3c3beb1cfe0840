"""A live view of a study in the browser: ``optuna-dashboard`` over the search's storage.

Every trial carries what a reader needs as user attributes (see
:mod:`hcomposer.search.loop`): ``pattern``, ``role`` (what the trial became),
``task_scores`` (per proxy task), ``scores`` (the objective values by name), ``cost``
(parameters, FLOPs/token, KV bytes/token, state bytes), ``wall_seconds``, ``owner`` and,
when it did not train, ``failure``. The dashboard reads the storage only; a search can run
while it is open.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from hcomposer.errors import UserError
from hcomposer.runs import SearchDir
from hcomposer.search.results import read_config
from hcomposer.search.storage import check_storage, open_storage, storage_url

__all__ = ["task_scores", "dashboard_storage", "serve"]


def task_scores(details: dict[str, Any]) -> dict[str, float | None]:
    """``{task: score}`` from a proxy result's ``tasks`` (accuracy where it has one)."""
    tasks = details.get("tasks")
    if not isinstance(tasks, dict):
        return {}
    out = {}
    for name, t in tasks.items():
        if isinstance(t, dict):
            out[str(name)] = t.get("accuracy", t.get("score"))
        elif isinstance(t, (int, float)):
            out[str(name)] = float(t)
    return out


def dashboard_storage(folder: str | None, storage: str | None) -> Any:
    """The storage to show: a search folder's, or a URL; UserError when neither works."""
    if (folder is None) == (storage is None):
        raise UserError("give a search folder or --storage URL (one of them)")
    if folder is not None:
        config = read_config(folder)
        url = storage_url(config.storage, folder)
        if config.storage is None and not SearchDir(folder).study_db.is_file():
            raise UserError(f"{folder!r} has no study.db yet; start the search first")
    else:
        check_storage(storage, ".")
        url = storage
    return open_storage(url, reader=True)


def serve(folder: str | None, storage: str | None, host: str, port: int) -> None:
    """Serve the dashboard until interrupted (blocks)."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise UserError(
            "hcomposer dashboard needs optuna-dashboard: pip install 'hcomposer[dashboard]'"
        )
    if not 0 < port < 65536:
        raise UserError(f"--port must be 1-65535, got {port}")
    backend = dashboard_storage(folder, storage)
    import optuna_dashboard

    print(f"dashboard: http://{host}:{port}/dashboard/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        optuna_dashboard.run_server(backend, host=host, port=port)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
