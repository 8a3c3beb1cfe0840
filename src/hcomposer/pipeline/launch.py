"""One process of a launched training: ``python -m hcomposer.pipeline.launch ARCH.json
TRAIN.json OUT`` trains the architecture with the train config (JSON) into ``OUT``, resuming
what is there. ``torchrun`` starts one per rank (``hcomposer.pipeline.rehearse``)."""

from __future__ import annotations

import sys
from pathlib import Path

from hcomposer.architecture import Architecture
from hcomposer.training.trainer import TrainConfig, train

__all__ = ["main"]


def main(argv: list[str]) -> int:
    arch_json, cfg_json, out = argv
    arch = Architecture.from_json(arch_json)
    cfg = TrainConfig.from_json(Path(cfg_json).read_text(encoding="utf-8"))
    result = train(arch, cfg, out, resume=True, progress=False)
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
