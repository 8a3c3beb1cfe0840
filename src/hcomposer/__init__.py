"""hcomposer: discover hybrid language-model architectures."""

from hcomposer.architecture import Architecture
from hcomposer.errors import PatternError, ShapeError, UserError
from hcomposer.pattern import canonical, format_pattern, from_megatron, parse_pattern, to_megatron
from hcomposer.shapes import PRESETS, Shape, get_shape, resolve_shape
from hcomposer.version import __version__

__all__ = [
    "Architecture",
    "Shape",
    "PRESETS",
    "get_shape",
    "resolve_shape",
    "parse_pattern",
    "format_pattern",
    "canonical",
    "to_megatron",
    "from_megatron",
    "build_model",
    "count_costs",
    "PatternError",
    "ShapeError",
    "UserError",
    "__version__",
]


def _install_hf_hook() -> None:
    from hcomposer._hf_hook import install

    install()


_install_hf_hook()


def __getattr__(name):
    # torch-heavy pieces load on first use so `hcomposer --help` stays quick.
    if name == "build_model":
        from hcomposer.model import build_model

        return build_model
    if name == "count_costs":
        from hcomposer.accounting import count_costs

        return count_costs
    raise AttributeError(name)
