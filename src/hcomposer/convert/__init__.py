"""Start from a pretrained model: load a teacher, convert chosen attention layers to S, D or W
(initialised from the attention weights), distil on the one training core, and search which
attention layers to keep."""

from hcomposer.convert.teacher import (
    SUPPORTED,
    Teacher,
    attention_layers,
    load_teacher,
    shape_from_config,
)

__all__ = ["SUPPORTED", "Teacher", "attention_layers", "load_teacher", "shape_from_config"]
