"""Execute notebooks in place on the offline defaults (one real run; `make notebooks-execute`), so the
committed notebooks show real outputs. Figures are kept as small PNGs; each notebook must stay under 1 MB.

    .venv/bin/python tools/execute_notebooks.py notebooks/BERT_anatomy.ipynb [...]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MAX_BYTES = 1_000_000


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {"ANATOMY_PRUNE_SMOKE": "0", "ANATOMY_PRUNE_ONLINE": "0", "MPLBACKEND": "Agg"}
    os.environ.update(env)
    start = time.perf_counter()
    NotebookClient(nb, timeout=7200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata["anatomy_prune"] = {"executed_s": round(seconds), "mode": "offline defaults",
                                    "executed": time.strftime("%Y-%m-%d", time.gmtime())}
    nbformat.write(nb, path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes after execution; keep it under {MAX_BYTES}")
    return seconds


def main(argv: list[str]) -> int:
    total = 0.0
    for p in map(Path, argv):
        s = execute(p)
        total += s
        print(f"{p.name}: {s:.0f} s, {p.stat().st_size / 1e3:.0f} kB", flush=True)
    print(f"all: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
