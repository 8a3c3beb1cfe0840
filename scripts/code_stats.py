"""Size measures of a source tree: file lengths, long functions, in-function package imports.

    python scripts/code_stats.py src/hcomposer

Counts what the code-layout goals speak of: files over 500 lines, functions over 60/80 lines,
and indented ``from hcomposer``/``import hcomposer`` lines (imports inside functions).
"""

from __future__ import annotations

import ast
import re
import statistics
import sys
from pathlib import Path


def main(root: Path) -> None:
    files = sorted(root.rglob("*.py"))
    lines = {p: len(p.read_text().splitlines()) for p in files}
    lengths = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append(node.end_lineno - node.lineno + 1)
    inner = re.compile(r"^\s+(from hcomposer|import hcomposer)")
    imports = sum(1 for p in files for line in p.read_text().splitlines() if inner.match(line))
    long_files = sorted(((n, str(p.relative_to(root))) for p, n in lines.items() if n > 500))
    print(f"files {len(files)}, median lines {statistics.median(lines.values())}")
    print(f"files over 500 lines: {long_files}")
    over60, over80 = sum(n > 60 for n in lengths), sum(n > 80 for n in lengths)
    print(f"functions {len(lengths)}, over 60 lines {over60}, over 80 lines {over80}")
    print(f"in-function package imports: {imports}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/hcomposer"))
