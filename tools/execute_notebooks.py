"""Execute notebooks in place on the offline defaults (one real run; `make notebooks-execute`), so the
committed notebooks show real outputs. Clean by construction: progress bars off (TQDM_DISABLE), widget
state stripped, and the outputs checked for noise (`noise_in`) before anything is written. Each notebook
must stay under 1 MB; its execution time, size and words of markdown go into its metadata and are printed.

    .venv/bin/python tools/execute_notebooks.py notebooks/BERT_anatomy.ipynb [...]
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MAX_BYTES = 1_000_000
WIDGETS = "application/vnd.jupyter.widget-view+json"
# What a reviewer must not meet in the outputs (the project's before-stop check, and tests/test_notebooks.py).
NOISE = {
    "progress-bar text": re.compile(r"\b0%\||\d+/\d+ \[\d\d:\d\d|it/s\]"),
    "machine paths": re.compile(r"site-packages|/tmp/|/root/|/home/|\.venv/|/work/"),
    "object reprs": re.compile(r"PosixPath\(|<[\w.]+ object at 0x|<Figure size|<IPython\.core"),
    "warnings": re.compile(r"Warning:|WARNING|Traceback"),
}


def output_text(out: dict) -> str:
    data = out.get("data", {})
    return "".join(out.get("text", "")) + "".join(data.get("text/plain", "")) + "".join(data.get("text/markdown", ""))


def noise_in(nb) -> list[str]:
    """Which kinds of noise the notebook's outputs hold (empty: clean)."""
    found = set()
    if "widgets" in nb.get("metadata", {}):
        found.add("widget state")
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if WIDGETS in out.get("data", {}):
                found.add("progress widgets")
            if out.get("output_type") == "error":
                found.add("errors")
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found.add("stderr")
            text = output_text(out)
            found.update(k for k, pattern in NOISE.items() if pattern.search(text))
    return sorted(found)


def markdown_words(nb) -> dict:
    """Words of markdown: in markdown cells (static) and rendered from the results (display outputs)."""
    static = sum(len("".join(c.source).split()) for c in nb.cells if c.cell_type == "markdown")
    rendered = sum(len("".join(o.get("data", {}).get("text/markdown", "")).split())
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if not "".join(o.get("data", {}).get("text/markdown", "")).lstrip().startswith("|"))
    return {"static": static, "rendered": rendered}


def strip_widgets(nb) -> None:
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            out.get("data", {}).pop(WIDGETS, None)


def execute(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ.update({"ANATOMY_PRUNE_SMOKE": "0", "ANATOMY_PRUNE_ONLINE": "0", "MPLBACKEND": "Agg",
                       "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"})
    start = time.perf_counter()
    NotebookClient(nb, timeout=7200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    strip_widgets(nb)
    noise = noise_in(nb)
    if noise:
        keep = Path(tempfile.gettempdir()) / f"rejected-{path.name}"
        nbformat.write(nb, keep)
        raise SystemExit(f"{path.name}: its outputs hold {', '.join(noise)}; the notebook is unchanged, the run "
                         f"is in {keep} to look at")
    words = markdown_words(nb)
    nb.metadata["anatomy_prune"] = {"executed_s": round(seconds), "mode": "offline defaults",
                                    "executed": time.strftime("%Y-%m-%d", time.gmtime()), "markdown_words": words}
    text = nbformat.writes(nb)
    if len(text.encode()) > MAX_BYTES:
        raise SystemExit(f"{path.name} would be {len(text.encode())} bytes; keep it under {MAX_BYTES}, nothing written")
    path.write_text(text)
    return {"seconds": seconds, "bytes": path.stat().st_size, **words}


def main(argv: list[str]) -> int:
    total = 0.0
    for p in map(Path, argv):
        r = execute(p)
        total += r["seconds"]
        print(f"{p.name}: {r['seconds']:.0f} s, {r['bytes'] / 1e3:.0f} kB, {r['static']} words of markdown "
              f"+ {r['rendered']} rendered from results", flush=True)
    print(f"all: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
