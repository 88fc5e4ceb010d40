"""The paper's sizes at full size (slow): bert-base-uncased- and gpt2-shaped models from the emulated hub go
through anatomy -> strategy and calibrated pruning -> save -> reload in a fresh process -> latency."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_full_size_bert_and_gpt2_pipeline(tmp_path):
    spec = importlib.util.spec_from_file_location("paper_sizes", ROOT / "benchmarks" / "paper_sizes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ps"
    assert mod.main(["--hub", str(tmp_path / "hub"), "--calib-size", "8", "--batch-size", "2", "--length", "32",
                     "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "paper_sizes.json").read_text())
    for m in result["models"]:
        assert m["params"] > 100e6 and m["pruned_params"] < m["params"]      # full size, physically smaller
        assert m["pruned_flops_per_token"] < m["flops_per_token"]
        assert set(m["steps"]) >= {"load", "anatomy", "prune strategy", "prune calibrated", "save",
                                   "reload (fresh process)", "latency"}
        assert all(s["peak_mb"] > 0 and s["seconds"] > 0 for s in m["steps"].values())
