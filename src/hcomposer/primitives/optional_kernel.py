"""A fused CUDA kernel from an optional package, looked up once per process.

S (``mamba_ssm``'s chunked scan) and D (``fla``'s chunked gated delta rule) each hold one. The
kernel is imported on first use; an environment variable set to ``torch`` turns it off; a
package that is missing, or present but not importable (no Triton, a broken CUDA install),
leaves the PyTorch path in use with the reason recorded for the one line each primitive logs.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OptionalKernel"]


@dataclass(kw_only=True)
class OptionalKernel:
    """``module.attr`` of the optional ``package`` (imported as ``top``), unless ``env`` is
    ``torch``. ``available()`` looks once (``looked``); then ``fn`` is the kernel (None when
    unusable) and ``reason`` says why not. ``announce`` logs the primitive's one line
    (``announced``: done). Tests put a stand-in in place with ``dataclasses.replace``."""

    package: str
    top: str
    module: str
    attr: str
    env: str
    fn: Callable[..., Any] | None = None
    reason: str = ""
    looked: bool = False
    announced: bool = False

    def available(self) -> bool:
        if not self.looked:
            self.looked = True
            self.fn, self.reason = self._lookup()
        return self.fn is not None

    def announce(
        self,
        log: logging.Logger,
        used: str,
        fallback: str,
        *,
        used_level: int = logging.INFO,
        fallback_level: int = logging.WARNING,
    ) -> None:
        """Log, once per process, which path runs: ``used`` when the kernel is usable, else
        ``fallback`` with its ``%s`` filled by the reason."""
        if self.announced:
            return
        self.announced = True
        if self.available():
            log.log(used_level, used)
        else:
            log.log(fallback_level, fallback, self.reason)

    def _lookup(self) -> tuple[Callable[..., Any] | None, str]:
        if os.environ.get(self.env, "").lower() == "torch":
            return None, f"{self.env}=torch"
        try:
            return getattr(importlib.import_module(self.module), self.attr), ""
        except ImportError as e:
            if getattr(e, "name", "") == self.top:
                return None, f"{self.package} is not installed"
            # The package is there but something it needs (Triton, ...) is not.
            return None, f"{self.package} is not usable ({type(e).__name__}: {e})"
        except Exception as e:  # a broken Triton/CUDA install
            return None, f"{self.package} is not usable ({type(e).__name__}: {e})"
