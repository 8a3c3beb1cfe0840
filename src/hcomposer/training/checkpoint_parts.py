"""The pieces both checkpoint layouts share (``hcomposer.training.checkpoint``'s gathered files
and ``hcomposer.training.sharded``'s per-rank shards): RNG states, names of the
optimiser's parameters, the optimiser state split into tensors and JSON, ``state.json``'s
record, the checks that refuse a checkpoint that does not fit, and the atomic rotation of the
checkpoint folder."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json
from hcomposer.runs import RunDir

__all__ = [
    "RNG_FILE",
    "rng_state",
    "set_rng_state",
    "save_rng",
    "write_state_json",
    "state_dict_api",
    "param_names",
    "tie_groups",
    "take_state",
    "split_optimizer",
    "join_optimizer",
    "DamagedCheckpoint",
    "damaged",
    "misfit",
    "differ",
    "check_optimizer",
    "forget_unsaved",
    "commit_folder",
]


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and numpy generator states as JSON, torch's as tensors."""
    py = random.getstate()
    np_state = np.random.get_state()
    json_state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *(x for x in np_state[2:])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return json_state, tensors


RNG_FILE = "rng.safetensors"


def save_rng(folder: Path) -> dict[str, Any]:
    """Write torch's generator states to ``folder/rng.safetensors``; returns Python's and
    numpy's, as JSON for ``state.json``."""
    rng_json, rng_tensors = rng_state()
    save_file(rng_tensors, str(folder / RNG_FILE))
    return rng_json


def write_state_json(
    folder: Path,
    fmt: str,
    state: dict[str, Any],
    opt_meta: dict[str, Any],
    rng: dict[str, Any],
    sha256: dict[str, str],
    **extra: Any,
) -> None:
    """``folder/state.json``: the layout's format, the caller's state (step, tokens, data), the
    optimiser state's JSON part, the generators' JSON part, ``extra`` and each file's sha256."""
    record = {"format": fmt, **state, "optimizer": opt_meta, "rng": rng, **extra, "sha256": sha256}
    atomic_write_json(folder / "state.json", record)


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = json_state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = json_state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def state_dict_api():
    """``torch.distributed.checkpoint.state_dict``, imported on first use: it imports torch's
    FSDP modules (about a second of start-up CPU time), which importing the trainer, the
    evaluation or the export should not pay before a checkpoint is read or written."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The fully qualified name of every parameter of each of ``optimizer``'s groups, as
    ``get_state_dict`` keys them (a tied parameter under its first name in ``model``).

    ``model`` is the module itself (sharded by FSDP or not), not a DDP or compile wrapper.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("param_names: the optimiser holds a parameter the model has not") from None


def tie_groups(entries: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of a model's state-dict entries (``state_dict(keep_vars=True)``) that are one
    tensor (a tied embedding and head), each group sorted, for groups of more than one name."""
    groups: dict[int, list[str]] = {}
    for name, value in entries.items():
        groups.setdefault(id(value), []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def take_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, whole: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimiser state keyed by name). ``whole``: gathered onto rank 0's host
    (empty on the other ranks); otherwise each rank's shards (DTensors under FSDP)."""
    api = state_dict_api()
    if whole:
        options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    else:
        options = api.StateDictOptions()
    if optimizer.state:
        return api.get_state_dict(model, optimizer, options=options)
    # No step taken yet: get_state_dict would first create AdamW's state by a step with zero
    # gradients (lr 0), which the run and a resumed run would then count as a step taken.
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": names}
        for group, names in zip(optimizer.param_groups, param_names(model, optimizer))
    ]
    return api.get_model_state_dict(model, options=options), {"state": {}, "param_groups": groups}


def split_optimizer(
    state: dict, *, to_host: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of an optimiser state (keyed ``"{parameter}.{state name}"``, moved to the
    host unless ``to_host`` is False) and the rest as JSON (groups, scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                tensors[f"{param}.{name}"] = value.cpu().contiguous() if to_host else value
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    # A parameter's name has dots, AdamW's state names ("step", "exp_avg", "exp_avg_sq") none.
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class DamagedCheckpoint(UserError):
    """A checkpoint whose files fail their checks; ``what`` says which check."""

    def __init__(self, folder: Path, what: str):
        super().__init__(
            f"checkpoint {str(folder)!r} is damaged: {what}; restore it, or delete "
            f"{str(folder)!r} to start the run over"
        )
        self.what = what


def damaged(folder: Path, what: str) -> UserError:
    return DamagedCheckpoint(folder, what)


def misfit(folder: Path, what: str) -> UserError:
    return UserError(
        f"checkpoint {str(folder)!r} does not fit this model: {what}; load it into the "
        "architecture (and hcomposer version) that wrote it"
    )


def differ(ours: set[str], theirs: set[str], owner: str = "the model") -> str:
    """Which names one side has and the other lacks (a parameter renamed or removed)."""
    lacks, extra = sorted(ours - theirs), sorted(theirs - ours)
    parts = [f"it lacks {owner}'s {lacks[:4]}"] if lacks else []
    parts += [f"it holds {extra[:4]}, which {owner} lacks"] if extra else []
    return " and ".join(parts) + " (a parameter renamed, added or removed)"


def check_optimizer(folder: Path, osd: dict, model: torch.nn.Module, names: list[list[str]]):
    """Refuse an optimiser state whose names, groups or shapes are not this optimiser's."""
    ours = {n for group in names for n in group}
    try:
        groups = [set(group["params"]) for group in osd["param_groups"]]
        theirs = set().union(*groups, osd["state"])
    except (KeyError, TypeError) as e:
        raise damaged(folder, f"its optimiser parameter groups do not read ({e})") from None
    if theirs != ours:
        raise misfit(folder, "optimiser state: " + differ(ours, theirs, "this optimiser"))
    if groups != [set(group) for group in names]:
        raise misfit(
            folder, "its optimiser groups its parameters otherwise (another weight-decay rule)"
        )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for param, per in osd["state"].items():
        for key, value in per.items():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
            if shape and shape != shapes[param]:
                raise misfit(
                    folder,
                    f"optimiser state {param}.{key} is {shape}, the parameter {shapes[param]}",
                )


def forget_unsaved(optimizer: torch.optim.Optimizer, names: list[list[str]], osd: dict) -> None:
    """Drop the state of parameters the checkpoint has none for: set_state_dict first creates
    every parameter's state by a step with zero gradients (lr 0), and a parameter that had no
    gradient yet (an expert no token chose) must start from no state, as in the saved run."""
    for group, group_names in zip(optimizer.param_groups, names):
        for p, name in zip(group["params"], group_names):
            if name not in osd["state"]:
                optimizer.state.pop(p, None)


def commit_folder(tmp: Path, run_dir: Path) -> Path:
    """Rename the whole checkpoint ``tmp`` to ``RUN/checkpoint``, the one there before to
    ``RUN/.checkpoint.old`` (replacing the one before it); returns the new folder."""
    run = RunDir(run_dir)
    final, old = run.checkpoint, run.previous_checkpoint
    if final.exists():
        # Only now is the one before the previous redundant: the new one is whole.
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    return final
