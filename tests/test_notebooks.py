"""Every notebook runs top to bottom in smoke mode (tiny models, small sizes), so notebooks cannot rot."""
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_seven_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"BERT_anatomy.ipynb", "GPT2_anatomy.ipynb", "BERT_pruning_baseline.ipynb", "GPT2_pruning_baseline.ipynb",
            "BERT_pruning_strategy.ipynb", "GPT2_pruning_strategy.ipynb", "GPT_finepruning.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed notebooks carry no bulky outputs
        assert not cell.get("outputs"), f"{path.name} has committed outputs; clear them"
    monkeypatch.setenv("ANATOMY_PRUNE_SMOKE", "1")
    monkeypatch.setenv("ANATOMY_PRUNE_RUNS", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
