"""Every notebook runs top to bottom in smoke mode, offline (embedded models) and online (the paper's
bert-base-uncased / gpt2 and the hub's IMDB, from the emulated hub), so notebooks cannot rot. The committed
notebooks carry the outputs of a real run (make notebooks-execute), each under 1 MB, with a tagged
parameters cell."""
import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_000_000


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
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert ("online" if online else "offline") in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_offline_in_smoke_mode(path, notebook_runs, monkeypatch):
    _run(path, notebook_runs[False], monkeypatch, online=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_online_on_the_emulated_hub(path, notebook_runs, monkeypatch, hub_offline):
    if not hub_offline.env.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_DATASETS_CACHE") is None and \
            __import__("importlib").util.find_spec("datasets") is None:
        pytest.skip("the emulated hub has no IMDB (datasets is not installed)")
    _run(path, notebook_runs[True], monkeypatch, online=True)
