"""The rules for reusing an output folder: refuse anything but this run, resume only with the
settings it was started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcomposer.architecture import Architecture
from hcomposer.config_io import read_run_file
from hcomposer.errors import UserError
from hcomposer.runs import RUN_JSON, RunDir

__all__ = ["check_out_dir"]


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
