"""Sharded checkpoint files: every rank writes its own shards, none gathers the whole state.

The files are written and read by ``torch.distributed.checkpoint`` (``save`` / ``load``) with
its Hugging Face storage writer and reader (``torch.distributed.checkpoint.hf_storage``,
``save_distributed=True``, no consolidation): rank ``r`` writes
``shard-{r+1:05d}-model-00001-of-00001.safetensors`` holding its local pieces of every tensor,
each with its offsets in the global tensor in the file's safetensors metadata (JSON, key
``DCP_SHARDING_INFO``). Only tensors are ever given to ``save`` (scalars and parameter groups
stay in ``state.json``), so no item is written as a pickle; the reader rebuilds the global
shapes from the safetensors headers, so no pickled ``.metadata`` file is written or read.

Loading reads, into each target tensor, the slices of every stored piece that overlap it: a
``DTensor`` shard of any world size (a resumed run with more or fewer processes) or a whole
tensor (one process, DDP, ``export``, ``eval``). The checks (names, shapes, checksums) and the
folder's rotation are ``hcomposer.training.checkpoint``'s; this module only moves tensors.

Every rank must see the same folder (a shared filesystem, as for the run folder itself).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from hcomposer.io import current_umask, sha256_file
from hcomposer.training import checkpoint_parts as parts

__all__ = [
    "FORMAT",
    "save_sharded",
    "load_sharded",
    "checked_files",
    "read_whole",
    "write_shards",
    "read_shards",
    "stored_shapes",
    "shard_files",
    "gather_digests",
]

FORMAT = "hcomposer.checkpoint/sharded-1"
MODEL, OPTIMIZER = "model", "optimizer"
_TMP = ".checkpoint.tmp-sharded"

_SUFFIX = ".safetensors"


def _dcp():
    """``torch.distributed.checkpoint`` and its HF storage, imported on first use (about a
    second of start-up CPU time that runs which never write a sharded checkpoint skip)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import (
        HuggingFaceStorageReader,
        HuggingFaceStorageWriter,
    )

    return dcp, HuggingFaceStorageWriter, HuggingFaceStorageReader


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence dcp's notice that one process saves or loads alone: that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def write_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (DTensors: each rank its shards; plain tensors: one rank's copy) into
    ``folder``, one safetensors file per rank holding anything. Collective: every rank calls
    it with the same names."""
    dcp, writer, _ = _dcp()
    folder.mkdir(parents=True, exist_ok=True)
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with _quiet():
            dcp.save(
                tensors, storage_writer=writer(str(folder), save_distributed=True), no_dist=no_dist
            )
    except dcp.CheckpointException as e:  # a BaseException: re-raised as an ordinary error
        raise RuntimeError(f"writing the shards in {str(folder)!r} failed: {e}") from None


def read_shards(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` in place from the shards in ``folder`` (each target its own slice of
    the stored tensor). Collective when a target is a DTensor; otherwise each process reads
    alone. Raises RuntimeError when the files do not hold what the targets need."""
    if not targets:
        return
    dcp, _, reader = _dcp()
    from torch.distributed.tensor import DTensor  # with dcp, on first use

    sharded = any(isinstance(t, DTensor) for t in targets.values())
    no_dist = not (sharded and dist.is_available() and dist.is_initialized())
    try:
        with _quiet():
            dcp.load(targets, storage_reader=reader(str(folder)), no_dist=no_dist)
    except dcp.CheckpointException as e:
        raise RuntimeError(f"reading the shards in {str(folder)!r} failed: {e}") from None


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor stored in ``folder``'s shards (headers only)."""
    _, _, reader = _dcp()
    metadata = reader(str(folder)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()}


def shard_files(folder: Path, rank: int | None = None) -> list[Path]:
    """The shard files in ``folder`` (all of them, or those rank ``rank`` wrote), sorted."""
    if not folder.is_dir():
        return []
    prefix = "shard-" if rank is None else f"shard-{rank + 1:05d}-"
    names = (p for p in folder.iterdir() if p.name.startswith(prefix))
    return sorted(p for p in names if p.name.endswith(_SUFFIX))


def gather_digests(folders: list[Path]) -> dict[Path, str]:
    """The sha256 of every shard file in ``folders``, each hashed by the rank that wrote it
    (the hashing is spread over the ranks); the digests travel as tensors (no pickled
    objects). Collective; every rank returns the whole map."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    # At most one file per folder and rank (one bucket: no fqn-to-file mapping is given).
    mine = torch.zeros(len(folders), 32, dtype=torch.uint8)
    for i, folder in enumerate(folders):
        files = shard_files(folder, rank)
        if len(files) > 1:
            raise RuntimeError(f"rank {rank} wrote {len(files)} files into {str(folder)!r}")
        if files:
            mine[i] = torch.tensor(list(bytes.fromhex(sha256_file(files[0]))), dtype=torch.uint8)
    everyone = [mine]
    if world > 1:
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        everyone = [torch.empty_like(mine, device=device) for _ in range(world)]
        dist.all_gather(everyone, mine.to(device))
    sums: dict[Path, str] = {}
    for r, digests in enumerate(everyone):
        for i, folder in enumerate(folders):
            files = shard_files(folder, r)
            if files:
                sums[files[0]] = bytes(digests[i].cpu().tolist()).hex()
    return sums


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path | None:
    """Write ``RUN/checkpoint`` as per-rank shards (see the module docstring); collective.
    Rank 0 writes ``rng.safetensors`` and ``state.json`` (with every file's sha256, each
    hashed by its writer) and renames the folder into place; it returns the folder, the other
    ranks None."""
    ties = parts.tie_groups(model.state_dict(keep_vars=True))
    # Each tied tensor once, under its first name; state.json names the others.
    aliases = {name: group[0] for group in ties for name in group[1:]}
    weights, osd = parts.take_state(model, optimizer, whole=False)
    tensors = {k: v for k, v in weights.items() if k not in aliases}
    opt_tensors, opt_meta = parts.split_optimizer(osd, to_host=False)
    tmp = run_dir / _TMP
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a kill during an earlier save
        tmp.mkdir()
        os.chmod(tmp, 0o777 & ~current_umask())
    _barrier()
    try:
        write_shards(tmp / MODEL, tensors)
        write_shards(tmp / OPTIMIZER, opt_tensors)
        sums = gather_digests([tmp / MODEL, tmp / OPTIMIZER])
        if _rank() != 0:
            return None
        rng = parts.save_rng(tmp)
        files = {parts.RNG_FILE: sha256_file(tmp / parts.RNG_FILE)}
        files.update((path.relative_to(tmp).as_posix(), digest) for path, digest in sums.items())
        world = dist.get_world_size() if dist.is_initialized() else 1
        parts.write_state_json(
            tmp, FORMAT, state, opt_meta, rng, files, aliases=aliases, world_size=world
        )
        return parts.commit_folder(tmp, run_dir)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def checked_files(folder: Path, sums: dict[str, str]) -> list[str]:
    """The files of a sharded checkpoint whose sha256 ``read_state`` checks: those state.json
    lists. A tensor file it does not list is refused (the reader would read it too)."""
    listed = sorted(name for name in sums if name != "rng.safetensors")
    for sub in (MODEL, OPTIMIZER):
        for path in sorted((folder / sub).glob("*" + _SUFFIX)) if (folder / sub).is_dir() else ():
            if f"{sub}/{path.name}" not in sums:
                raise parts.damaged(folder, f"{sub}/{path.name} is not one of its files")
    if not any(name.startswith(MODEL + "/") for name in listed):
        raise parts.damaged(folder, "state.json lists no model shards")
    return ["rng.safetensors", *listed]


def _shapes(folder: Path, sub: str) -> dict[str, tuple[int, ...]]:
    if not shard_files(folder / sub):
        return {}
    try:
        return stored_shapes(folder / sub)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise parts.damaged(folder, f"its {sub} shards do not read ({e})") from None


def _check_weights(folder: Path, model: torch.nn.Module, aliases: dict[str, str]) -> None:
    shapes = _shapes(folder, MODEL)
    expected = {
        k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in aliases
    }
    if set(shapes) != set(expected):
        raise parts.misfit(folder, parts.differ(set(expected), set(shapes)))
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise parts.misfit(folder, f"{k} is {shapes[k]} in it, {shape} here")


def load_sharded(
    folder: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Load a sharded checkpoint (checked by ``read_state``) into ``model`` (and
    ``optimizer``), whole or sharded by FSDP at any number of processes: each target reads
    the slices it needs. Names and shapes are checked first (a UserError naming them)."""
    api = parts.state_dict_api()
    aliases = state.get("aliases") or {}
    _check_weights(folder, model, aliases)
    options = api.StateDictOptions(strict=False)
    if optimizer is None:
        weights, targets = api.get_model_state_dict(model, options=options), {}
    else:
        names = parts.param_names(model, optimizer)
        stored = _shapes(folder, OPTIMIZER)
        meta = {k: torch.empty(s, device="meta") for k, s in stored.items()}
        try:
            parts.check_optimizer(
                folder, parts.join_optimizer(meta, state["optimizer"]), model, names
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise parts.damaged(folder, f"its optimiser state does not read ({e})") from None
        # Creates every parameter's state (forget_unsaved drops what the checkpoint lacks).
        weights, live = api.get_state_dict(model, optimizer, options=options)
        targets = {}
        for key in stored:
            param, name = key.rsplit(".", 1)
            targets[key] = live["state"][param][name]
    try:
        read_shards(folder / MODEL, {k: v for k, v in weights.items() if k not in aliases})
        for name, first in aliases.items():
            if name in weights and first in weights:
                weights[name] = weights[first]
        if optimizer is None:
            api.set_model_state_dict(model, weights, options=options)
            return
        read_shards(folder / OPTIMIZER, targets)
        osd = parts.join_optimizer(targets, state["optimizer"])
        api.set_state_dict(
            model, optimizer, model_state_dict=weights, optim_state_dict=osd, options=options
        )
        parts.forget_unsaved(optimizer, names, osd)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, SafetensorError) as e:
        raise parts.damaged(folder, f"its state does not load ({e})") from None


def read_whole(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in ``folder``'s shards, whole, on the host (one process)."""
    if not shard_files(folder):
        return {}
    _, _, reader = _dcp()
    metadata = reader(str(folder)).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.items()}
    read_shards(folder, out)
    return out
