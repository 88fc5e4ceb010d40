"""Size measures of the package that issue 21 tracks: the most parameters of a public function, the functions
over 60 lines and the longest one, the number of modules and the longest module.

    .venv/bin/python tools/code_metrics.py [src/anatomy_prune]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def measure(root: Path) -> dict:
    public, lengths = [], []
    modules = sorted(root.rglob("*.py"))
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"{path.relative_to(root)}:{node.name}"
            lengths.append((node.end_lineno - node.lineno + 1, where))
            if not node.name.startswith("_"):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                n -= bool(a.args) and a.args[0].arg in ("self", "cls")
                public.append((n, where))
    sizes = [(len(p.read_text().splitlines()), str(p.relative_to(root))) for p in modules]
    return {"most_parameters": max(public), "over_8_parameters": sorted(x for x in public if x[0] > 8),
            "longest_function": max(lengths), "functions_over_60_lines": sorted(x for x in lengths if x[0] > 60),
            "modules": len(modules), "longest_module": max(sizes)}


if __name__ == "__main__":
    for key, value in measure(Path(sys.argv[1] if len(sys.argv) > 1 else "src/anatomy_prune")).items():
        print(f"{key}: {value}")
