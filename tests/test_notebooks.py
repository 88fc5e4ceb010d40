"""Every notebook runs top to bottom in smoke mode, offline (embedded models) and online (the paper's
bert-base-uncased / gpt2 and the hub's IMDB, from the emulated hub), so notebooks cannot rot, and its outputs
hold no noise. The committed notebooks carry the outputs of a real run (make notebooks-execute): all have
outputs, none holds progress bars, widget state, machine paths, object reprs, tracebacks or warnings, and each
is under 1 MB, with a tagged parameters cell, a Colab badge and a first cell that names the model."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_000_000
sys.path.insert(0, str(ROOT / "tools"))
from execute_notebooks import noise_in  # noqa: E402


def test_there_are_seven_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"BERT_anatomy.ipynb", "GPT2_anatomy.ipynb", "BERT_pruning_baseline.ipynb", "GPT2_pruning_baseline.ipynb",
            "BERT_pruning_strategy.ipynb", "GPT2_pruning_strategy.ipynb", "GPT_finepruning.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_small_parameterised_and_installs_from_one_place(path):
    assert path.stat().st_size < MAX_BYTES
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "ONLINE" in "".join(tagged[0]["source"]) and "SMOKE" in "".join(tagged[0]["source"])
    install = "".join(code[0]["source"])
    assert 'REPO = "' in install and "anatomy-prune[notebooks]" in install and "OFFLINE_PACKAGES" in install
    assert not any("sys.path" in "".join(c["source"]) for c in code)  # no path hacks: the package is installed
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was committed with an error output"


# the model each family studies offline and the paper's model it stands in for, named in the first cell
NAMED = {"BERT_": ("MiniLM", "bert-base-uncased"), "GPT": ("SmolLM2", "gpt2")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_executed_clean_and_introduced(path):
    """The committed file: a real run's outputs in every code cell after the install cell, no noise, a
    Colab badge and a first cell naming the model of each mode."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code[1:]), f"{path.name} has code cells that were not executed"
    assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{path.name} carries too few outputs"
    assert noise_in(nb) == [], f"{path.name} has {noise_in(nb)} in its committed outputs"
    first = nb.cells[0].source
    offline, paper = next(v for k, v in NAMED.items() if path.name.startswith(k))
    assert "colab.research.google.com/github/" in first and offline in first and paper in first
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no figure"


def _run(path: Path, runs: Path, monkeypatch, online: bool) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # run from the sources, not the committed outputs
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("ANATOMY_PRUNE_SMOKE", "1")
    monkeypatch.setenv("ANATOMY_PRUNE_ONLINE", "1" if online else "0")
    monkeypatch.setenv("ANATOMY_PRUNE_RUNS", str(runs))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert ("online" if online else "offline") in text
    # clean by construction, not by luck: the smoke run is as clean as the committed one
    stderr = [o.get("text", "") for o in outputs if o.get("name") == "stderr"]
    assert noise_in(nb) == [], f"{path.name} in smoke mode printed {noise_in(nb)}: {stderr[:2]}"


def _grouped(mode: str) -> list:
    """The notebooks as parameters, each family's in one pytest-xdist group per mode: the first notebook of a
    family fine-tunes and the others reuse its run folder, as beside a checkout (and the work is done once)."""
    return [pytest.param(p, id=p.stem, marks=pytest.mark.xdist_group(f"{mode}-{p.name.split('_')[0].lower()}"))
            for p in NOTEBOOKS]


@pytest.mark.parametrize("path", _grouped("offline"))
def test_notebook_runs_offline_in_smoke_mode(path, notebook_runs, monkeypatch):
    _run(path, notebook_runs[False], monkeypatch, online=False)


@pytest.mark.parametrize("path", _grouped("online"))
def test_notebook_runs_online_on_the_emulated_hub(path, notebook_runs, monkeypatch, hub_offline):
    if hub_offline.imdb_sizes is None or importlib.util.find_spec("datasets") is None:
        pytest.skip("the emulated hub has no IMDB (datasets is not installed)")
    _run(path, notebook_runs[True], monkeypatch, online=True)
