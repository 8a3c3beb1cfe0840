"""Checkpoints (safetensors + JSON, never pickle; atomic; checksummed) and the rules for
reusing an output folder.

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
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, current_umask, read_json, sha256_file
from hcomposer.runs import RUN_JSON, RunDir

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
    "check_out_dir",
    "set_rng_state",
    "FORMAT",
    "FORMAT_V1",
]

FORMAT = "hcomposer.checkpoint/2"
# The optimiser state keyed by parameter index (the optimiser's order); still read.
FORMAT_V1 = "hcomposer.checkpoint/1"
_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


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


def _state_dict_api():
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


def _tie_groups(entries: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of a model's state-dict entries (``state_dict(keep_vars=True)``) that are one
    tensor (a tied embedding and head), each group sorted, for groups of more than one name."""
    groups: dict[int, list[str]] = {}
    for name, value in entries.items():
        groups.setdefault(id(value), []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def _gather(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimiser state keyed by name), whole, on rank 0's host; empty elsewhere."""
    api = _state_dict_api()
    options = api.StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer.state:
        return api.get_state_dict(model, optimizer, options=options)
    # No step taken yet: get_state_dict would first create AdamW's state by a step with zero
    # gradients (lr 0), which the run and a resumed run would then count as a step taken.
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": names}
        for group, names in zip(optimizer.param_groups, param_names(model, optimizer))
    ]
    return api.get_model_state_dict(model, options=options), {"state": {}, "param_groups": groups}


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    # A parameter's name has dots, AdamW's state names ("step", "exp_avg", "exp_avg_sq") none.
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _names_for_indices(folder: Path, state: dict, flat: list[str]) -> dict:
    """A format-1 optimiser state (keyed by index in the optimiser's order) keyed by name."""
    try:
        groups = [[int(i) for i in group["params"]] for group in state["param_groups"]]
        per_index = {int(i): per for i, per in state["state"].items()}
    except (KeyError, ValueError, TypeError) as e:
        raise _damaged(folder, f"its optimiser state does not read ({e})") from None
    indices = [i for group in groups for i in group]
    if sorted(indices) != list(range(len(flat))) or not set(per_index) <= set(indices):
        raise _misfit(
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
) -> Path | None:
    """Write ``RUN/checkpoint`` atomically; ``state`` (step, tokens, data...) goes to state.json.

    ``model`` is the module itself, whole or sharded by FSDP (not a DDP or compile wrapper).
    In a distributed run every process must call it (FSDP gathers each tensor from its
    shards); rank 0 writes and returns the folder, the other ranks return None.
    """
    ties = _tie_groups(model.state_dict(keep_vars=True))
    tensors, optim_state = _gather(model, optimizer)
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
    final = RunDir(run_dir).checkpoint
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint.tmp-"))
    # mkdtemp makes the folder 0700; a run folder follows the user's umask.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=aliases or None)
        opt_tensors, opt_meta = _split_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_json, rng_tensors = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        record = {
            "format": FORMAT,
            **state,
            "optimizer": opt_meta,
            "rng": rng_json,
            "sha256": {name: sha256_file(tmp / name) for name in _FILES},
        }
        atomic_write_json(tmp / "state.json", record)
        old = RunDir(run_dir).previous_checkpoint
        if final.exists():
            # Only now is the one before the previous redundant: the new one is whole.
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
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


class DamagedCheckpoint(UserError):
    """A checkpoint whose files fail their checks; ``what`` says which check."""

    def __init__(self, folder: Path, what: str):
        super().__init__(
            f"checkpoint {str(folder)!r} is damaged: {what}; restore it, or delete "
            f"{str(folder)!r} to start the run over"
        )
        self.what = what


def _damaged(folder: Path, what: str) -> UserError:
    return DamagedCheckpoint(folder, what)


def _misfit(folder: Path, what: str) -> UserError:
    return UserError(
        f"checkpoint {str(folder)!r} does not fit this model: {what}; load it into the "
        "architecture (and hcomposer version) that wrote it"
    )


def _differ(ours: set[str], theirs: set[str], owner: str = "the model") -> str:
    """Which names one side has and the other lacks (a parameter renamed or removed)."""
    lacks, extra = sorted(ours - theirs), sorted(theirs - ours)
    parts = [f"it lacks {owner}'s {lacks[:4]}"] if lacks else []
    parts += [f"it holds {extra[:4]}, which {owner} lacks"] if extra else []
    return " and ".join(parts) + " (a parameter renamed, added or removed)"


def read_state(folder: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint after checking every file's sha256."""
    folder = Path(folder)
    try:
        state = read_json(folder / "state.json")
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"state.json cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_V1):
        raise _damaged(folder, "state.json is not an hcomposer checkpoint record")
    sums = state.get("sha256")
    if not isinstance(sums, dict):
        raise _damaged(folder, "state.json holds no checksums")
    for key in ("step", "optimizer", "rng"):
        if key not in state:
            raise _damaged(folder, f"state.json has no {key!r}")
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        if sha256_file(path) != sums.get(name):
            raise _damaged(folder, f"{name} fails its sha256 check (truncated or modified)")
    return state


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as e:
        raise _damaged(folder, f"{name} cannot be read ({e})") from None


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
        osd = _join_optimizer(_load_tensors(folder, "optimizer.safetensors"), state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _damaged(folder, f"its optimiser state does not read ({e})") from None
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
    for group in _tie_groups(expected):
        stored = next((name for name in group if name in tensors), None)
        for name in group if stored is not None else ():
            tensors.setdefault(name, tensors[stored])
    if set(tensors) != set(expected):
        raise _misfit(folder, _differ(set(expected), set(tensors)))
    wrong = [k for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise _misfit(
            folder, f"{k} is {tuple(tensors[k].shape)} in it, {tuple(expected[k].shape)} here"
        )
    return tensors


def _check_optimizer(folder: Path, osd: dict, model: torch.nn.Module, names: list[list[str]]):
    """Refuse an optimiser state whose names, groups or shapes are not this optimiser's."""
    ours = {n for group in names for n in group}
    try:
        groups = [set(group["params"]) for group in osd["param_groups"]]
        theirs = set().union(*groups, osd["state"])
    except (KeyError, TypeError) as e:
        raise _damaged(folder, f"its optimiser parameter groups do not read ({e})") from None
    if theirs != ours:
        raise _misfit(folder, "optimiser state: " + _differ(ours, theirs, "this optimiser"))
    if groups != [set(group) for group in names]:
        raise _misfit(
            folder, "its optimiser groups its parameters otherwise (another weight-decay rule)"
        )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for param, per in osd["state"].items():
        for key, value in per.items():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
            if shape and shape != shapes[param]:
                raise _misfit(
                    folder,
                    f"optimiser state {param}.{key} is {shape}, the parameter {shapes[param]}",
                )


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify, then load weights (and optimiser and RNG states) in place; returns state.json.

    ``model`` is the module itself, whole or sharded by FSDP (then every process calls this
    and reads the files; each keeps its shard). A checkpoint whose parameter names or shapes
    are not the model's is a UserError naming them.
    """
    folder = Path(folder)
    state = read_state(folder)
    weights = _read_weights(folder, model)
    if optimizer is not None:
        names = param_names(model, optimizer)
        osd = _read_optimizer(folder, state, names)
        _check_optimizer(folder, osd, model, names)
    api = _state_dict_api()
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
            _forget_unsaved(optimizer, names, osd)
        if restore_rng:
            set_rng_state(state["rng"], _load_tensors(folder, "rng.safetensors"))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _damaged(folder, f"its state does not load ({e})") from None
    return state


def _forget_unsaved(optimizer: torch.optim.Optimizer, names: list[list[str]], osd: dict) -> None:
    """Drop the state of parameters the checkpoint has none for: set_state_dict first creates
    every parameter's state by a step with zero gradients (lr 0), and a parameter that had no
    gradient yet (an expert no token chose) must start from no state, as in the saved run."""
    for group, group_names in zip(optimizer.param_groups, names):
        for p, name in zip(group["params"], group_names):
            if name not in osd["state"]:
                optimizer.state.pop(p, None)


def check_out_dir(
    out: Path, arch: Architecture, config: dict[str, Any], resume: bool, may_differ: set[str]
) -> bool:
    """Refuse a folder holding anything but this run; True when there is a run to resume.

    ``config`` is the training config as a dict; fields in ``may_differ`` may change on resume.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; choose a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return False
    run = RunDir(out)
    run_json = run.run_json
    if not run_json.is_file():
        raise UserError(
            f"output folder {str(out)!r} is not empty and holds no hcomposer run; "
            "choose a new or empty folder"
        )
    if not resume:
        status = run.read_status().get("status", "unknown")
        raise UserError(
            f"output folder {str(out)!r} already holds a run (status {status}); pass --resume "
            "to continue it, or choose another --out"
        )
    stored = read_run_file(out, RUN_JSON, keys=("config",), versioned=True)["config"]
    try:
        stored_arch = Architecture.from_dict(stored["architecture"])
        stored_cfg = dict(stored["train"])
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(
            f"run folder {str(out)!r} is damaged: run.json cannot be read ({e}); "
            "restore it from a copy, or choose another --out"
        ) from None
    # The stored shape had its vocabulary and length set from the tokenizer: compare the rest.
    free = {"vocab_size": 0, "max_seq_len": 0}
    if stored_arch.pattern != arch.pattern or dict(stored_arch.shape.to_dict(), **free) != dict(
        arch.shape.to_dict(), **free
    ):
        raise UserError(
            f"output folder {str(out)!r} holds a run of {stored_arch}, not {arch}; "
            "choose another --out to train this architecture"
        )
    differ = [
        k
        for k in sorted(set(stored_cfg) | set(config))
        if k not in may_differ and stored_cfg.get(k) != config.get(k)
    ]
    if differ:
        raise UserError(
            f"--resume: the run in {str(out)!r} was started with other settings "
            f"({', '.join(differ)}); repeat the original options or choose another --out"
        )
    return True
