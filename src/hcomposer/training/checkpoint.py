"""Checkpoints (safetensors + JSON, never pickle; atomic; checksummed) and the rules for
reusing an output folder.

A checkpoint is the folder ``RUN/checkpoint``:

- ``model.safetensors``: the model's state dict (tied weights stored once);
- ``optimizer.safetensors``: every tensor of the optimiser state, keyed ``"{param}.{name}"``;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: step, tokens, data position, the optimiser's scalar state (param groups),
  Python and numpy RNG states, and the sha256 of each file above, checked on load.

It is written into a temporary folder that is renamed into place. The previous checkpoint is
first renamed to ``.checkpoint.old`` and removed afterwards, so a kill at any moment leaves
either the old or the new checkpoint whole (``find_checkpoint`` looks at both).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file
from hcomposer.errors import UserError
from hcomposer.io import atomic_write_json, current_umask, read_json, sha256_file
from hcomposer.runs import RUN_JSON, RunDir

__all__ = [
    "save_checkpoint",
    "save_checkpoint_state",
    "load_checkpoint",
    "read_optimizer_state",
    "find_checkpoint",
    "rng_state",
    "read_state",
    "check_out_dir",
    "set_rng_state",
    "FORMAT",
]

FORMAT = "hcomposer.checkpoint/1"
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


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``RUN/checkpoint`` atomically; ``state`` (step, tokens, data...) goes to state.json."""
    return save_checkpoint_state(
        run_dir, lambda path: save_model(model, path), optimizer.state_dict(), state
    )


def save_checkpoint_state(
    run_dir: str | Path,
    model_tensors: dict[str, torch.Tensor] | Any,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """``save_checkpoint`` from state dicts (the FSDP path gathers them on rank 0).

    ``model_tensors``: the weights as ``save_model`` would store them (a tied parameter
    once), or a function writing ``model.safetensors`` to the path it is given.
    """
    run_dir = Path(run_dir)
    final = RunDir(run_dir).checkpoint
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint.tmp-"))
    # mkdtemp makes the folder 0700; a run folder follows the user's umask.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        if callable(model_tensors):
            model_tensors(str(tmp / "model.safetensors"))
        else:
            save_file(model_tensors, str(tmp / "model.safetensors"))
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
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            # Only now is the previous .checkpoint.old redundant: ``final`` is whole.
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """``RUN/checkpoint``, or the previous one if a kill fell between the two renames."""
    final = RunDir(run_dir).checkpoint
    for folder in (final, final.with_name(f".{final.name}.old")):
        if (folder / "state.json").is_file():
            return folder
    return None


def _damaged(folder: Path, what: str) -> UserError:
    return UserError(
        f"checkpoint {str(folder)!r} is damaged: {what}; restore it, or delete "
        f"{str(folder)!r} to start the run over"
    )


def read_state(folder: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint after checking every file's sha256."""
    folder = Path(folder)
    try:
        state = read_json(folder / "state.json")
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"state.json cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
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


def read_optimizer_state(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's optimiser state dict (``torch.optim`` form, tensors on the CPU)."""
    folder = Path(folder)
    state = read_state(folder)
    return _join_optimizer(load_file(str(folder / "optimizer.safetensors")), state["optimizer"])


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify, then load weights (and optimiser and RNG states) in place; returns state.json."""
    folder = Path(folder)
    state = read_state(folder)
    try:
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise _damaged(folder, f"model.safetensors does not fit this model ({e})") from None
    if missing or unexpected:
        raise _damaged(
            folder,
            f"weights do not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); architecture.json disagrees with them",
        )
    try:
        if optimizer is not None:
            tensors = load_file(str(folder / "optimizer.safetensors"))
            device = next(model.parameters()).device
            tensors = {
                k: v.to(device) if not k.endswith(".step") else v for k, v in tensors.items()
            }
            optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"]))
        if restore_rng:
            set_rng_state(state["rng"], load_file(str(folder / "rng.safetensors")))
    except (SafetensorError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _damaged(folder, f"its optimiser or RNG state does not load ({e})") from None
    return state


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
