"""One install makes a notebook work anywhere: build the wheel, install it with its `notebooks` extra into a
fresh virtual environment that has nothing else (torch comes from the extra's requirement; on this machine
the pinned CPU wheel is taken), and run a notebook there in online mode on the emulated hub. Configs and
probes must come from inside the package, never from a checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))[:200]}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)], timeout=600)
    wheels = list(out.glob("anatomy_prune-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_the_wheel_ships_configs_and_probes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "anatomy_prune/configs/paper_figure5a.toml" in names
    assert "anatomy_prune/data/probes.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".gguf", ".csv"))]
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: notebooks" in meta and "Provides-Extra: cluster" in meta and "Provides-Extra: peers" in meta
    assert "ray" not in [line.split(";")[0].split(">")[0].split("=")[0].strip().removeprefix("Requires-Dist: ")
                         for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra" not in line]


@pytest.mark.xdist_group("online-bert")  # after the BERT notebooks' online runs, whose fine-tune it reuses
def test_fresh_install_with_the_extra_runs_a_notebook_online(wheel, tmp_path, emulated_hub, notebook_runs):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py = venv / "bin" / "python"
    start = time.perf_counter()
    # torch pinned to the version this project tests (an unpinned torch would pull a multi-GB CUDA build)
    run([str(py), "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0", f"{wheel}[notebooks]"], timeout=1200)
    install_s = time.perf_counter() - start
    # the package works from the install alone: no checkout on the path, configs and probes packaged
    probe = run([str(py), "-c", "import anatomy_prune, json; from anatomy_prune.resources import config_path; "
                 "from anatomy_prune.data import load_probes; "
                 "print(json.dumps([anatomy_prune.__file__, str(config_path('paper_figure5a.toml')), len(load_probes())]))"],
                cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    where, config, n_probes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert str(venv) in where and str(venv) in config and n_probes == 10
    # a kernel of that environment runs the notebook online (bert-base-uncased + the hub's IMDB, emulated)
    kernels = tmp_path / "kernels"
    run([str(py), "-m", "ipykernel", "install", "--prefix", str(kernels), "--name", "fresh-wheel"], timeout=300)
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "BERT_anatomy.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nb.cells.append(nbformat.v4.new_code_cell('import sys, anatomy_prune\nprint("KERNEL", sys.executable, anatomy_prune.__file__)'))
    # the online fine-tune another test already ran (tests/test_notebooks.py) is reused, as a notebook reuses a
    # run folder with the same recipe; run alone, this test fine-tunes in the fresh environment itself
    done = notebook_runs[True] / "finetune-smoke-online-bert-base-uncased"
    if (done / "finetune.json").is_file():
        shutil.copytree(done, tmp_path / "runs" / done.name)
    env = {**emulated_hub.env, "ANATOMY_PRUNE_SMOKE": "1", "ANATOMY_PRUNE_ONLINE": "1",
           "ANATOMY_PRUNE_RUNS": str(tmp_path / "runs"), "MPLBACKEND": "Agg", "PYTHONPATH": "",
           "JUPYTER_PATH": str(kernels / "share" / "jupyter")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=900, kernel_name="fresh-wheel", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)  # the settings table the notebook displays
    assert "| mode | online" in shown or "online" in text
    kernel_line = next(line for line in text.splitlines() if line.startswith("KERNEL"))
    assert kernel_line.count(str(venv)) == 2  # the fresh environment's python and its installed package
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    print(f"fresh install: {install_s:.0f} s; wheel {wheel.stat().st_size / 1e3:.0f} kB")
