"""Self-contained remote code for ``HComposerForCausalLM`` folders: torch + transformers only.

The folder's ``modeling_hcomposer.py`` is not a copy kept by hand: at export time the
package's own source files (``hf/modeling_hcomposer.py``, ``hf/configuration_hcomposer.py``
and every module they import from ``hcomposer``, plus every primitive in the registry) are
written into the folder as flat files, with only their ``hcomposer`` imports rewritten to
relative ones (``from hcomposer.primitives.attention import X`` becomes
``from .hcomposer_primitives_attention import X``). The code that loads the folder is thus
byte for byte the code hcomposer runs, apart from those import lines, so it cannot drift.

``transformers`` copies a remote-code file together with the files it imports relatively,
so the modeling file also imports every primitive module (the registry resolves them by name
at run time, which ``transformers`` cannot see). Any ``hcomposer`` reference left after the
rewrite, or a registry line that no longer has the expected form, fails the export loudly.
"""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

from hcomposer.io import atomic_write_text
from hcomposer.primitive_specs import SPECS

__all__ = [
    "flat_name",
    "module_source",
    "remote_code_files",
    "shipped_modules",
    "write_remote_code",
]

ENTRY_MODULES = ("hcomposer.hf.configuration_hcomposer", "hcomposer.hf.modeling_hcomposer")
# Entry modules keep the names that ``auto_map`` points to.
_FIXED = {
    "hcomposer.hf.configuration_hcomposer": "configuration_hcomposer",
    "hcomposer.hf.modeling_hcomposer": "modeling_hcomposer",
}
_IMPORT = re.compile(r"^(\s*)from (hcomposer(?:\.\w+)*) import ", re.MULTILINE)
# The registry's run-time import by name, rewritten to the flat file of each primitive.
_REGISTRY_IMPORT = "importlib.import_module(s.module)"
_REGISTRY_FLAT = 'importlib.import_module(f"{__package__}." + s.module.replace(".", "_"))'
_PRIMS = "hcomposer.primitives."


def flat_name(module: str) -> str:
    """The file stem a package module gets in an export folder."""
    return _FIXED.get(module, module.replace(".", "_"))


def module_source(module: str) -> str:
    """The source text of a module of the installed hcomposer package."""
    parts = module.split(".")
    base = resources.files("hcomposer")
    path = base.joinpath(*parts[1:], "__init__.py")
    if not path.is_file():
        path = base.joinpath(*parts[1:-1], parts[-1] + ".py")
    return path.read_text(encoding="utf-8")


def _imports(source: str) -> list[str]:
    """Every ``hcomposer`` module imported by ``from hcomposer... import`` anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "hcomposer" or node.module.startswith("hcomposer."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hcomposer":
                    raise ValueError(f"`import {alias.name}` cannot be made relative")
    return found


def _closure() -> list[str]:
    """The modules to ship: the entries, every primitive, and what they import, sorted."""
    todo = list(ENTRY_MODULES) + [s.module for s in SPECS.values() if s.module.startswith(_PRIMS)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        if module == "hcomposer":
            raise ValueError("remote code may not import the hcomposer package root")
        seen.add(module)
        todo.extend(_imports(module_source(module)))
    return sorted(seen)


def _rewrite(module: str, source: str) -> str:
    def repl(m: re.Match) -> str:
        return f"{m.group(1)}from .{flat_name(m.group(2))} import "

    text = _IMPORT.sub(repl, source)
    if module == "hcomposer.primitives":
        if _REGISTRY_IMPORT not in text:
            raise ValueError(
                "hcomposer.primitives no longer imports primitives by "
                f"{_REGISTRY_IMPORT!r}: update export_remote"
            )
        text = text.replace(_REGISTRY_IMPORT, _REGISTRY_FLAT)
    if module == "hcomposer.hf.modeling_hcomposer":
        # Static relative imports, so that transformers copies every primitive's file.
        modules = sorted(
            {s.module.removeprefix(_PRIMS) for s in SPECS.values() if s.module.startswith(_PRIMS)}
        )
        lines = "".join(
            f"from .hcomposer_primitives_{m} import __all__ as _{m}_names  # noqa: E402\n"
            for m in modules
        )
        note = "# Imported so that transformers copies every primitive's file with this one.\n"
        text = text.rstrip("\n") + "\n\n" + note + lines
    left = [
        line
        for line in text.splitlines()
        if re.search(r"\bhcomposer\.\w", line) and re.match(r"\s*(from|import)\s", line)
    ]
    if left:
        raise ValueError(f"{module}: imports of hcomposer left after the rewrite: {left}")
    return text


def shipped_modules() -> dict[str, str]:
    """File name in an export folder -> the package module it is generated from."""
    return {flat_name(m) + ".py": m for m in _closure()}


def remote_code_files() -> dict[str, str]:
    """File name -> text of the self-contained remote code for an hcomposer folder."""
    return {name: _rewrite(m, module_source(m)) for name, m in shipped_modules().items()}


def write_remote_code(out: Path) -> list[str]:
    """Write the remote-code files into ``out``; returns their names."""

    files = remote_code_files()
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return sorted(files)
