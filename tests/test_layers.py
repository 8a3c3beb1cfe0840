"""The package's imports point down the layers, form no cycle and never take a ``_private`` name
from another module (read from the source with ``ast``; nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "hcomposer"

# Lowest first, read from ARCHITECTURE.md's ```layers block (the one declaration of the
# layers): a module may import modules of its own layer or of a lower one. The most specific
# prefix decides a module's layer; "<rest>" (the empty prefix) is everything else.
ARCHITECTURE = SRC.parent / "ARCHITECTURE.md"


def _read_layers() -> list[tuple[str, ...]]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    return [
        tuple("" if name == "<rest>" else name for name in line.split())
        for line in block.splitlines()
        if line.strip()
    ]


LAYERS: list[tuple[str, ...]] = _read_layers()


def _layer(module: str) -> int:
    name = module.removeprefix("hcomposer").removeprefix(".")
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".") or p == "") and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, module
    return rank


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(line, imported module, names, top level?) for every import of the package's modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hcomposer":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # "from hcomposer.search import results"
                    yield node.lineno, sub, [], id(node) in top
                else:
                    yield node.lineno, target, [alias.name], id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hcomposer":
                    yield node.lineno, alias.name, [], id(node) in top


def _graph():
    modules = _modules()
    edges = {}
    for mod, path in modules.items():
        edges[mod] = [
            (line, target, names, top)
            for line, target, names, top in _imports(mod, path, modules)
            if target != mod
        ]
    return modules, edges


def test_imports_point_down():
    modules, edges = _graph()
    bad = []
    for mod, imports in edges.items():
        for line, target, _, _ in imports:
            if _layer(target) > _layer(mod):
                bad.append(f"{modules[mod].relative_to(SRC)}:{line}: {mod} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module():
    modules, edges = _graph()
    bad = [
        f"{modules[mod].relative_to(SRC)}:{line}: {name} from {target}"
        for mod, imports in edges.items()
        for line, target, names, _ in imports
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_import_cycle():
    modules, edges = _graph()
    graph = {
        m: sorted({t if t in modules else t.rpartition(".")[0] for _, t, _, _ in imps})
        for m, imps in edges.items()
    }
    # A package's __init__ re-exporting its modules is not a cycle with them.
    graph = {m: [t for t in ts if not m.startswith(t + ".")] for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# Lazy imports of the package's own modules, kept for start-up time (measured; a comment
# beside each says so): `import hcomposer` stays free of torch and transformers, the trainer
# imports torch's FSDP modules only under --fsdp (about a second of start-up CPU time), and the
# commands import torch-heavy modules inside their functions, because `hcomposer --help`
# imports every command module (0.14 s of CPU, 9.2 s with the imports at the top).
LAZY_ALLOWED = (
    "hcomposer",
    "hcomposer._hf_hook",
    "hcomposer.training.trainer",
    "hcomposer.commands.",
)


def test_imports_at_top_of_files():
    modules, edges = _graph()
    bad = [
        f"{modules[mod].relative_to(SRC)}:{line}: {target}"
        for mod, imports in edges.items()
        if mod not in LAZY_ALLOWED and not mod.startswith(LAZY_ALLOWED[-1])
        for line, target, _, top in imports
        if not top
    ]
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_every_layer_name_exists():
    """A name in ARCHITECTURE.md's layers that matches no module is a stale document."""
    modules = _modules()
    names = [n for layer in LAYERS for n in layer if n]
    missing = [
        n
        for n in names
        if not any(m == f"hcomposer.{n}" or m.startswith(f"hcomposer.{n}.") for m in modules)
    ]
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above catch what they are for (the layers are read, not assumed)."""
    assert _layer("hcomposer.training.trainer") > _layer("hcomposer.model")
    assert _layer("hcomposer.plots") < _layer("hcomposer.evaluation.niah")
    assert _layer("hcomposer.reporting.compare") > _layer("hcomposer.evaluation.suite")
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from hcomposer.cli import _Parser\n")
    found = list(_imports("hcomposer.model", path, {}))
    assert found == [(2, "hcomposer.cli", ["_Parser"], False)]


def test_no_package_cycle():
    """Packages taken whole (``hcomposer.evaluation`` for all its modules) import no package
    that imports them back: the cycle between evaluation and reporting stays gone."""
    modules, edges = _graph()

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for mod, imps in edges.items():
        for _, target, _, _ in imps:
            a, b = package(mod), package(target)
            if a != b and b != "hcomposer":
                graph.setdefault(a, set()).add(b)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        if a == b:
            return True
        seen.add(a)
        return any(reaches(n, b, seen) for n in graph.get(a, ()) if n not in seen)

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a, set()))
    assert not cycles, "package cycles:\n" + "\n".join(cycles)


# The stage code a reader follows first stays short: no function over 60 lines or with more
# than 8 parameters (``self``/``cls`` not counted) in these packages.
SHORT_PACKAGES = ("pipeline", "proxies", "evaluation")
MAX_LINES, MAX_PARAMS = 60, 8


def _oversized(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        params = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES or params > MAX_PARAMS:
            found.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, {params} params")
    return found


def test_stage_functions_stay_short():
    bad = [
        f"{package}/{hit}"
        for package in SHORT_PACKAGES
        for path in sorted((PKG / package).rglob("*.py"))
        for hit in _oversized(path)
    ]
    assert not bad, "functions too long or with too many parameters:\n" + "\n".join(bad)


def test_the_size_check_sees_a_long_function(tmp_path):
    path = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    path.write_text(f"def long():\n{body}\ndef wide(self, a, b, c, d, e, f, g, h, i):\n    pass\n")
    hits = _oversized(path)
    assert [h.split()[1] for h in hits] == ["long:", "wide:"]
    assert "62 lines" in hits[0] and "9 params" in hits[1]
