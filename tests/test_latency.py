"""The latency benchmark: dense vs masked vs physically pruned copies (pipeline.latency), its table
(pipeline.report.markdown_table) and the script benchmarks/latency.py."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.apply import physical
from anatomy_prune.evaluate.timing import fixed_inputs, noncontiguous_params
from anatomy_prune.models.families import base_model, ffn_widths
from anatomy_prune.models.loading import TINY
from anatomy_prune.pipeline.latency import build_variants, latency_sweep, make_strided
from anatomy_prune.pipeline.requests import TimingSpec
from anatomy_prune.pipeline.report import markdown_table
from anatomy_prune.plan import plan_from_scores
from anatomy_prune.scores.calibration import Calibration

from conftest import assert_tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def half_plan(model, sparsity=0.5):
    return plan_from_scores([torch.arange(w, dtype=torch.float) for w in ffn_widths(model)], sparsity)


@pytest.fixture
def tiny_bert():
    loaded = load_model("tiny-bert", device="cpu")
    assert_tiny(loaded)
    return loaded


def test_physical_weights_contiguous_and_strided_control_same_output(tiny):
    pruned = physical(copy.deepcopy(tiny.model), half_plan(tiny.model))
    assert noncontiguous_params(pruned) == []
    inputs = fixed_inputs(base_model(tiny.model).get_input_embeddings().num_embeddings, 2, 8)
    with torch.inference_mode():
        expected = pruned(**inputs)[0]
    strided = make_strided(copy.deepcopy(pruned))
    if tiny.family.name != "gpt2":  # GPT-2's Conv1D is left alone
        assert noncontiguous_params(strided)
    with torch.inference_mode():
        torch.testing.assert_close(strided(**inputs)[0], expected)


def test_variants_are_pruned_copies_of_one_plan(tiny_bert):
    before = {k: v.clone() for k, v in tiny_bert.model.state_dict().items()}
    variants, plans = build_variants(tiny_bert, Calibration(tiny_bert, []), 0.5, multiples=[8], strided=True)
    assert set(variants) == {"dense", "mask", "physical", "physical-x8", "physical-strided"}
    assert variants["dense"] is tiny_bert.model
    assert all(m is not tiny_bert.model for k, m in variants.items() if k != "dense")
    assert all(torch.equal(v, tiny_bert.model.state_dict()[k]) for k, v in before.items())  # dense untouched
    assert plans["mask"].keep == plans["physical"].keep == plans["physical-strided"].keep
    assert ffn_widths(variants["mask"]) == [37] * 3 and ffn_widths(variants["physical"]) == [19] * 3
    assert ffn_widths(variants["physical-x8"]) == [24] * 3 and plans["physical-x8"].params["multiple_of"] == 8
    inputs = fixed_inputs(tiny_bert.tokenizer.vocab_size, 2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(variants["physical"](**inputs)[0], variants["mask"](**inputs)[0],
                                   rtol=1e-5, atol=1e-5)


def test_latency_sweep_rows_and_bound(tiny_bert):
    res = latency_sweep(tiny_bert, [0.5], [1], [8, 16], repeats=2, timing=TimingSpec(warmup=0, multiples=[8]),
                        progress=False)
    rows = res["rows"]
    assert {r["variant"] for r in rows} == {"dense", "mask", "physical", "physical-x8"}
    assert len(rows) == 4 * 2
    by = {(r["variant"], r["seq_len"]): r for r in rows}
    assert by[("dense", 8)]["ideal_speedup"] == pytest.approx(1.0)
    ph, mk, x8 = by[("physical", 16)], by[("mask", 16)], by[("physical-x8", 16)]
    assert ph["ffn_widths"] == [19] * 3 and x8["ffn_widths"] == [24] * 3
    assert mk["flops_per_token"] == by[("dense", 16)]["flops_per_token"]  # masked: dense FLOPs...
    assert mk["ideal_speedup"] == pytest.approx(ph["ideal_speedup"])  # ...held to its plan's bound
    assert 1.0 < x8["ideal_speedup"] < ph["ideal_speedup"]
    assert ph["efficiency"] == pytest.approx(ph["speedup"] / ph["ideal_speedup"])
    assert ph["param_reduction"] > 0 and mk["params"] == by[("dense", 16)]["params"]
    assert ffn_widths(tiny_bert.model) == [37] * 3  # the dense model is never pruned
    table = markdown_table(res)
    assert table.count("\n") == 3 and "| 50% | 19 |" in table
    with pytest.raises(UserError, match="no cuda rows"):
        markdown_table(res, device="cuda")
    with pytest.raises(UserError, match="positions"):
        latency_sweep(tiny_bert, [0.5], [1], [TINY["positions"] + 1], progress=False)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        latency_sweep(tiny_bert, [1.0], [1], [8], progress=False)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_main_end_to_end(tmp_path):
    out = tmp_path / "bench"
    rc = _bench().main(["--model", "tiny-bert", "--sparsities", "0.5", "--batch-sizes", "2", "--lengths", "16",
                        "--repeats", "2", "--devices", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "latency.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["threads"] >= 1
    assert data["load_before"] is None or len(data["load_before"]) == 3
    rows = data["results"][0]["rows"]
    assert {r["variant"] for r in rows} == {"dense", "mask", "physical"}
    assert all(r["repeats"] == 2 and r["median_s"] > 0 for r in rows)
    assert len(list(out.glob("latency_*.json"))) == 1
    assert "| 50% |" in (out / "table.md").read_text()
    assert (out / "figures" / "speedup_cpu.png").stat().st_size > 0
    assert not (out / ".anatomy-prune-resume.json").exists()  # progress file removed when the run completes
    redo = tmp_path / "redo"
    assert _bench().main(["--from-json", str(out / "latency.json"), "--out", str(redo), "--no-figure"]) == 0
    assert (redo / "table.md").read_text() == (out / "table.md").read_text()


def test_benchmark_bad_input_exits_2(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--model", "tiny-bert", "--lengths", "4096", "--quick", "--out", str(tmp_path / "x")]) == 2
    assert "positions" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
    if not torch.cuda.is_available():
        assert bench.main(["--model", "tiny-bert", "--devices", "cuda", "--quick", "--out", str(tmp_path / "y")]) == 2
        assert "no requested device" in capsys.readouterr().err
        assert not (tmp_path / "y").exists()
