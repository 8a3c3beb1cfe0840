"""Checkpoints (safetensors + JSON, never pickle; atomic; checksummed).

A checkpoint is the folder ``RUN/checkpoint``:

- ``model.safetensors``: the model's state dict (a tied parameter once, under the first of its
  names in sorted order, the others in the file's metadata, as ``safetensors.torch.save_model``
  stores it);
- ``optimizer.safetensors``: every tensor of the optimiser state, keyed
  ``"{parameter name}.{state name}"`` (e.g. ``layers.0.mixer.q_proj.weight.exp_avg``);
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: step, tokens, data position, the optimiser's scalar state and parameter groups
  (each group's parameters by name), Python and numpy RNG states, and the sha256 of each file
  above, checked on load.

One path serves one process, DDP and FSDP: the state is taken and put back through
``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` / ``set_state_dict`` with
``full_state_dict=True``), which names every parameter by its fully qualified name whatever
wraps or shards the model, gathers FSDP's shards whole onto rank 0's host (rank 0 writes) and
cuts each rank's shard again on load. Only that module's in-memory state-dict API is used:
its file format (``torch.distributed.checkpoint.save``) writes pickled metadata, and this
project never unpickles. Rank 0 therefore needs host memory for the whole weights and
optimiser state (16 bytes per parameter in fp32 with AdamW).

Keyed by name, an optimiser state cannot land on the wrong parameter: a model whose parameters
were renamed, added or removed is refused with the names that differ. Checkpoints of format
``hcomposer.checkpoint/1`` keyed the optimiser state by parameter index (the optimiser's
order); they are still read, the indices mapped to the names of the optimiser's parameters.

It is written into a temporary folder that is renamed into place. The previous checkpoint is
first renamed to ``.checkpoint.old`` (replacing the one before it) and kept, so a kill at any
moment leaves the old or the new checkpoint whole (``find_checkpoint`` looks at both), and a
latest checkpoint that later fails its checksums is replaced by the previous one
(``usable_checkpoint``, which says so). The last two checkpoints take twice the disk space.

An FSDP run writes its checkpoints sharded instead (``save_checkpoint(..., sharded_files=True)``,
format ``FORMAT_SHARDED``): every rank writes its own shards under ``model/`` and
``optimizer/`` and nothing is gathered (``hcomposer.training.sharded``); the same checks,
checksums, rotation and fallback apply, and :func:`load_checkpoint` reads either layout.

The rules for reusing an output folder are ``hcomposer.training.out_dir``'s.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hcomposer.errors import UserError
from hcomposer.io import current_umask, read_json, sha256_file
from hcomposer.runs import RunDir
from hcomposer.training import sharded
from hcomposer.training.checkpoint_parts import (
    RNG_FILE,
    DamagedCheckpoint,
    check_optimizer,
    commit_folder,
    damaged,
    differ,
    forget_unsaved,
    join_optimizer,
    misfit,
    param_names,
    rng_state,
    save_rng,
    set_rng_state,
    split_optimizer,
    state_dict_api,
    take_state,
    tie_groups,
    write_state_json,
)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_optimizer_state",
    "param_names",
    "find_checkpoint",
    "usable_checkpoint",
    "DamagedCheckpoint",
    "set_aside_damaged",
    "rng_state",
    "read_state",
    "set_rng_state",
    "FORMAT",
    "FORMAT_V1",
    "FORMAT_SHARDED",
]

FORMAT = "hcomposer.checkpoint/2"
# The optimiser state keyed by parameter index (the optimiser's order); still read.
FORMAT_V1 = "hcomposer.checkpoint/1"
# Each rank's shards (``hcomposer.training.sharded``) instead of model and optimizer files.
FORMAT_SHARDED = sharded.FORMAT
_FILES = ("model.safetensors", "optimizer.safetensors", RNG_FILE)


def _names_for_indices(folder: Path, state: dict, flat: list[str]) -> dict:
    """A format-1 optimiser state (keyed by index in the optimiser's order) keyed by name."""
    try:
        groups = [[int(i) for i in group["params"]] for group in state["param_groups"]]
        per_index = {int(i): per for i, per in state["state"].items()}
    except (KeyError, ValueError, TypeError) as e:
        raise damaged(folder, f"its optimiser state does not read ({e})") from None
    indices = [i for group in groups for i in group]
    if sorted(indices) != list(range(len(flat))) or not set(per_index) <= set(indices):
        raise misfit(
            folder, f"its optimiser state has {len(indices)} parameters, this optimiser {len(flat)}"
        )
    return {
        "state": {flat[i]: per for i, per in per_index.items()},
        "param_groups": [
            {**group, "params": [flat[i] for i in ids]}
            for group, ids in zip(state["param_groups"], groups)
        ],
    }


def save_checkpoint(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    sharded_files: bool = False,
) -> Path | None:
    """Write ``RUN/checkpoint`` atomically; ``state`` (step, tokens, data...) goes to state.json.

    ``model`` is the module itself, whole or sharded by FSDP (not a DDP or compile wrapper).
    In a distributed run every process must call it (FSDP gathers each tensor from its
    shards); rank 0 writes and returns the folder, the other ranks return None.
    ``sharded_files``: each rank writes its own shards instead (``FORMAT_SHARDED``, see
    ``hcomposer.training.sharded``); nothing is gathered.
    """
    if sharded_files:
        return sharded.save_sharded(Path(run_dir), model, optimizer, state)
    ties = tie_groups(model.state_dict(keep_vars=True))
    tensors, optim_state = take_state(model, optimizer, whole=True)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    # Each tied tensor once, under its first name; the others point at it (save_model's way).
    aliases = {name: group[0] for group in ties for name in group[1:]}
    tensors = {k: v.contiguous() for k, v in tensors.items() if k not in aliases}
    return _write(Path(run_dir), tensors, aliases, optim_state, state)


def _write(
    run_dir: Path,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint.tmp-"))
    # mkdtemp makes the folder 0700; a run folder follows the user's umask.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=aliases or None)
        opt_tensors, opt_meta = split_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = save_rng(tmp)
        sums = {name: sha256_file(tmp / name) for name in _FILES}
        write_state_json(tmp, FORMAT, state, opt_meta, rng, sums)
        final = commit_folder(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """``RUN/checkpoint``, or the previous one if a kill fell between the two renames."""
    run = RunDir(run_dir)
    for folder in (run.checkpoint, run.previous_checkpoint):
        if (folder / "state.json").is_file():
            return folder
    return None


def usable_checkpoint(run_dir: str | Path, *, tell: bool = True) -> Path | None:
    """The latest checkpoint that passes :func:`read_state`'s checks, or None when there is
    none at all.

    When ``RUN/checkpoint`` is damaged (a checksum fails, a file is missing) and the previous
    one is whole, the previous one is returned and, with ``tell``, one line on stderr says so.
    When neither is whole, the latest one's error is raised (a UserError saying how to recover).
    """
    run = RunDir(run_dir)
    latest, previous = run.checkpoint, run.previous_checkpoint
    if not latest.exists():
        # A kill between the two renames of a save: the previous one is the latest.
        if not previous.is_dir():
            return None
        read_state(previous)
        return previous
    try:
        read_state(latest)
        return latest
    except DamagedCheckpoint as damage:
        if not previous.is_dir():
            raise
        try:
            step = read_state(previous)["step"]
        except UserError:
            raise damage from None
        if tell:
            print(
                f"hcomposer: warning: checkpoint {str(latest)!r} is damaged ({damage.what}); "
                f"using the previous checkpoint instead (step {step}, {str(previous)!r})",
                file=sys.stderr,
            )
        return previous


def set_aside_damaged(run_dir: str | Path) -> Path | None:
    """Move a damaged ``RUN/checkpoint`` to ``RUN/checkpoint.damaged`` (replacing an older
    one) once training resumed from the previous checkpoint: the next save then keeps the
    good previous one instead of rotating the damaged one into its place."""
    run = RunDir(run_dir)
    if not run.checkpoint.exists():
        return None
    if run.damaged_checkpoint.exists():
        shutil.rmtree(run.damaged_checkpoint)
    os.replace(run.checkpoint, run.damaged_checkpoint)
    return run.damaged_checkpoint


def read_state(folder: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint after checking every file's sha256."""
    folder = Path(folder)
    try:
        state = read_json(folder / "state.json")
    except (OSError, ValueError) as e:
        raise damaged(folder, f"state.json cannot be read ({e})") from None
    known = (FORMAT, FORMAT_V1, FORMAT_SHARDED)
    if not isinstance(state, dict) or state.get("format") not in known:
        raise damaged(folder, "state.json is not an hcomposer checkpoint record")
    sums = state.get("sha256")
    if not isinstance(sums, dict):
        raise damaged(folder, "state.json holds no checksums")
    for key in ("step", "optimizer", "rng"):
        if key not in state:
            raise damaged(folder, f"state.json has no {key!r}")
    files = _FILES
    if state["format"] == FORMAT_SHARDED:
        files = sharded.checked_files(folder, sums)
    for name in files:
        path = folder / name
        if not path.is_file():
            raise damaged(folder, f"{name} is missing")
        if sha256_file(path) != sums.get(name):
            raise damaged(folder, f"{name} fails its sha256 check (truncated or modified)")
    return state


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as e:
        raise damaged(folder, f"{name} cannot be read ({e})") from None


def read_optimizer_state(
    folder: str | Path, names: list[list[str]] | None = None
) -> dict[str, Any]:
    """A checkpoint's optimiser state dict keyed by parameter name (``get_state_dict``'s
    form, tensors on the CPU). ``names`` (:func:`param_names`) reads a format-1 checkpoint,
    whose state is keyed by index."""
    folder = Path(folder)
    return _read_optimizer(folder, read_state(folder), names)


def _read_optimizer(folder: Path, state: dict[str, Any], names: list[list[str]] | None) -> dict:
    try:
        if state["format"] == FORMAT_SHARDED:
            tensors = sharded.read_whole(folder / sharded.OPTIMIZER)
        else:
            tensors = _load_tensors(folder, "optimizer.safetensors")
        osd = join_optimizer(tensors, state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(folder, f"its optimiser state does not read ({e})") from None
    if state["format"] == FORMAT_V1:
        if names is None:
            raise ValueError("read_optimizer_state: a format-1 checkpoint needs the names")
        osd = _names_for_indices(folder, osd, [n for group in names for n in group])
    return osd


def _read_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.safetensors as a full state dict of ``model`` (every name of a tied tensor),
    refused unless its names and shapes are the model's."""
    tensors = _load_tensors(folder, "model.safetensors")
    expected = model.state_dict(keep_vars=True)
    for group in tie_groups(expected):
        stored = next((name for name in group if name in tensors), None)
        for name in group if stored is not None else ():
            tensors.setdefault(name, tensors[stored])
    if set(tensors) != set(expected):
        raise misfit(folder, differ(set(expected), set(tensors)))
    wrong = [k for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise misfit(
            folder, f"{k} is {tuple(tensors[k].shape)} in it, {tuple(expected[k].shape)} here"
        )
    return tensors


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify, then load weights (and optimiser and RNG states) in place; returns state.json.

    ``model`` is the module itself, whole or sharded by FSDP (then every process calls this
    and reads the files; each keeps its shard). Gathered and sharded checkpoints load into
    either, at any number of processes. A checkpoint whose parameter names or shapes
    are not the model's is a UserError naming them.
    """
    folder = Path(folder)
    state = read_state(folder)
    if state["format"] == FORMAT_SHARDED:
        sharded.load_sharded(folder, state, model, optimizer)
        if restore_rng:
            set_rng_state(state["rng"], _load_tensors(folder, "rng.safetensors"))
        return state
    weights = _read_weights(folder, model)
    if optimizer is not None:
        names = param_names(model, optimizer)
        osd = _read_optimizer(folder, state, names)
        check_optimizer(folder, osd, model, names)
    api = state_dict_api()
    # Names and shapes are checked above, with messages; strict=True would also demand state
    # for every parameter, which one that never had a gradient (an idle expert) lacks.
    options = api.StateDictOptions(full_state_dict=True, strict=False)
    try:
        if optimizer is None:
            api.set_model_state_dict(model, weights, options=options)
        else:
            api.set_state_dict(
                model, optimizer, model_state_dict=weights, optim_state_dict=osd, options=options
            )
            forget_unsaved(optimizer, names, osd)
        if restore_rng:
            set_rng_state(state["rng"], _load_tensors(folder, "rng.safetensors"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise damaged(folder, f"its state does not load ({e})") from None
    return state
