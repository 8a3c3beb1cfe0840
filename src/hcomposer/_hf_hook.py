"""Register hcomposer with transformers' Auto classes once transformers' auto module loads.

``import hcomposer`` must make exported hybrid folders loadable by
``AutoModelForCausalLM.from_pretrained`` (model_type "hcomposer"), but importing
transformers costs seconds that ``hcomposer inspect`` should not pay. So: if
transformers' auto-model module is already loaded, register now; otherwise a small
meta-path finder waits for it and registers right after it has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install"]

_TARGET = "transformers.models.auto.modeling_auto"


def _register() -> None:
    import hcomposer.hf  # noqa: F401  (registration happens at its import)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the real loader of ``_TARGET`` so registration runs after it executes."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, name, path, target=None):
        if name != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                _uninstall()
                _register()

        spec.loader = _Loader()
        return spec


_finder = _Finder()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install() -> None:
    """Register now if transformers' auto classes are loaded, else when they load."""
    if _TARGET in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
