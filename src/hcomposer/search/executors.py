"""Where a trial's evaluation runs: in the worker itself (``local``) or as a Ray task (``ray``).

The search loop (ask, claim, tell) always runs in the workers of
:mod:`hcomposer.search.loop` and talks to the Optuna storage; an executor only decides
where ``objective(arch, proxy=..., seed=...)`` is computed. So results and the trial log
are the same whichever executor ran them, and a search started with one can be resumed
with the other (the executor is not part of the search's identity).

- ``LocalExecutor`` (default): ``--workers N`` spawned processes, each evaluating its own
  trials.
- ``RayExecutor``: ``--workers N`` threads in this process keep ``N`` trials in flight;
  each evaluation is a Ray task with ``--cpus-per-trial``/``--gpus-per-trial`` resources,
  placed by Ray's scheduler on any node of the cluster. A task lost with its worker or
  node is retried once by Ray (``max_retries=1``); a second loss fails the trial with
  ``failure = "ray task lost ..."``. An exception raised by the objective is not retried.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.errors import UserError

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "make_executor", "run_threads"]

EXECUTORS = ("local", "ray")


class Executor:
    """``with executor:`` connects; ``wrap(objective)`` gives what the workers call."""

    name = "base"
    #: True: the workers are threads of this process (their evaluations run elsewhere).
    threads = False
    #: True: the objective can be given the trial's ``report`` hook (``--pruner``).
    reports = True

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def wrap(self, objective: Callable[..., Any]) -> Callable[..., Any]:
        return objective


class LocalExecutor(Executor):
    """Evaluate in the worker processes themselves."""

    name = "local"


def _evaluate_task(objective, arch: Architecture, proxy: str, seed: int, cpus: float):
    """The body of one Ray task: evaluate one architecture on the node Ray picked."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return objective(arch, proxy=proxy, seed=seed)


class RayObjective:
    """An objective whose every call is one Ray task (see the module docstring)."""

    def __init__(self, objective: Callable[..., Any], cpus: float, gpus: float):
        import ray

        self.objective = objective
        self.cpus = cpus
        self._task = ray.remote(_evaluate_task).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=1, retry_exceptions=False
        )

    def __call__(self, arch: Architecture, *, proxy: str, seed: int) -> Any:
        import ray

        ref = self._task.remote(self.objective, arch, proxy, seed, self.cpus)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            # The objective itself raised: the engine sees the original exception.
            raise e.as_instanceof_cause() from None
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RuntimeError(
                f"ray task lost after 1 retry: {type(e).__name__}: {first[:200]}"
            ) from None


class RayExecutor(Executor):
    """Each evaluation is a Ray task; ``address`` None starts a local Ray instance
    (unless this process already joined one), ``"auto"`` or ``HOST:PORT`` joins a cluster."""

    name = "ray"
    threads = True
    # A Ray task runs on another process or node: its per-task values cannot reach the
    # trial while it runs, so it cannot be pruned.
    reports = False

    def __init__(
        self, address: str | None = None, *, cpus_per_trial: float = 1, gpus_per_trial: float = 0
    ):
        if importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray needs Ray: pip install 'hcomposer[ray]'")
        if cpus_per_trial <= 0 or gpus_per_trial < 0:
            raise UserError(
                f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got "
                f"{cpus_per_trial} and {gpus_per_trial}"
            )
        self.address = address
        self.cpus = cpus_per_trial
        self.gpus = gpus_per_trial
        self._started = False

    def __enter__(self) -> RayExecutor:
        import ray

        if ray.is_initialized():
            return self
        # No address: a fresh local instance (Ray would otherwise join any local cluster).
        kwargs: dict[str, Any] = {"address": self.address or "local", "log_to_driver": True}
        if self.address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = self.address or "a local instance"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--executor ray: cannot start or reach {where}: {first[:200]}"
            ) from None
        self._started = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def wrap(self, objective: Callable[..., Any]) -> Callable[..., Any]:
        return RayObjective(objective, self.cpus, self.gpus)


def make_executor(
    name: str = "local",
    *,
    ray_address: str | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
) -> Executor:
    """The executor of a command line; UserError for unknown names or misplaced options."""
    if name not in EXECUTORS:
        raise UserError(f"--executor {name!r} is not known; choose one of {', '.join(EXECUTORS)}")
    if name == "local":
        given = [
            flag
            for flag, v in (
                ("--ray-address", ray_address),
                ("--cpus-per-trial", cpus_per_trial),
                ("--gpus-per-trial", gpus_per_trial),
            )
            if v is not None
        ]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --executor ray")
        return LocalExecutor()
    return RayExecutor(
        ray_address,
        cpus_per_trial=1 if cpus_per_trial is None else cpus_per_trial,
        gpus_per_trial=0 if gpus_per_trial is None else gpus_per_trial,
    )


def run_threads(body: Callable[[int], list[str]], n: int) -> list[str]:
    """Run ``body(i)`` for ``i < n`` in threads; their notes, or the first error raised."""
    notes: list[list[str]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def main(i: int) -> None:
        try:
            notes[i] = body(i)
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)

    threads = [
        threading.Thread(target=main, args=(i,), name=f"hcomposer-search-{i}", daemon=True)
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    if errors:
        user = [e for e in errors if isinstance(e, UserError)]
        raise (user or errors)[0]
    return list(dict.fromkeys(x for ns in notes for x in ns))
