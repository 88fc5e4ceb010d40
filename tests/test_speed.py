import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.apply import physical
from anatomy_prune.evaluate import flops_per_token
from anatomy_prune.families import base_model, ffn_widths
from anatomy_prune.models import TINY
from anatomy_prune.plan import plan_from_scores
from anatomy_prune.speed import (Timing, fixed_inputs, forward_fn, ideal_speedup, latency_sweep, make_strided,
                                 markdown_table, model_ideal_speedup, noncontiguous_params, paired_speedup,
                                 round_widths, time_call, time_interleaved)

from conftest import assert_tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def half_plan(model, sparsity=0.5):
    return plan_from_scores([torch.arange(w, dtype=torch.float) for w in ffn_widths(model)], sparsity)


@pytest.fixture
def tiny_bert():
    loaded = load_model("tiny-bert", device="cpu")
    assert_tiny(loaded)
    return loaded


def test_time_call_gives_sane_stats(tiny_bert):
    inputs = fixed_inputs(tiny_bert.tokenizer.vocab_size, 2, 16)
    t = time_call(forward_fn(tiny_bert.model, inputs), warmup=1, repeats=5)
    d = t.to_dict()
    assert d["repeats"] == 5 and len(d["times_s"]) == 5
    assert 0 < d["min_s"] <= d["q1_s"] <= d["median_s"] <= d["q3_s"] <= d["max_s"] < 10


def test_time_interleaved_warms_up_and_rotates_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = time_interleaved(fns, warmup=2, repeats=3)
    assert calls[:6] == list("aabbcc")  # warm-up: each twice, untimed
    assert calls[6:] == list("abc") + list("bca") + list("cab")  # one call each per round, order rotated
    assert all(len(t.times_s) == 3 for t in out.values())
    with pytest.raises(UserError):
        time_interleaved(fns, repeats=0)


def test_paired_speedup_uses_rounds():
    dense, pruned = Timing([2.0, 4.0, 2.0]), Timing([1.0, 1.0, 2.0])
    s = paired_speedup(dense, pruned)
    assert s["speedup"] == pytest.approx(2.0)  # median 2.0 / median 1.0
    assert s["paired_median"] == pytest.approx(2.0)  # ratios 2, 4, 1
    assert s["paired_min"] == pytest.approx(1.0) and s["paired_max"] == pytest.approx(4.0)


def test_ideal_speedup_arithmetic_on_constructed_case(tiny_bert):
    d, f, layers, seq = TINY["hidden"], TINY["d_ff"], TINY["layers"], 16
    pruned = physical(copy.deepcopy(tiny_bert.model), half_plan(tiny_bert.model))
    kept = f - round(0.5 * f)  # 19 of 37
    assert ffn_widths(pruned) == [kept] * layers
    # per layer: Q, K, V, O (d x d), up and down (d x d_ff), 2 FLOPs per multiply-add, + attention 4 * seq * d
    dense_flops = layers * (2 * (4 * d * d + 2 * d * f) + 4 * seq * d)
    pruned_flops = layers * (2 * (4 * d * d + 2 * d * kept) + 4 * seq * d)
    assert flops_per_token(tiny_bert.model, seq) == dense_flops
    assert model_ideal_speedup(tiny_bert.model, pruned, seq) == pytest.approx(dense_flops / pruned_flops)
    assert ideal_speedup(10, 4) == 2.5
    with pytest.raises(ValueError):
        ideal_speedup(10, 0)


def test_round_widths_rounds_up_and_caps():
    assert round_widths([1382, 768, 5, 1530, 0], 8, [1536] * 5) == [1384, 768, 8, 1536, 0]
    assert round_widths([1382, 1530], 64, [1536, 1536]) == [1408, 1536]
    assert round_widths([37, 19], 1, [37, 37]) == [37, 19]


def test_fixed_inputs_exact_length_seeded():
    a = fixed_inputs(30522, 3, 17, seed=1)
    b = fixed_inputs(30522, 3, 17, seed=1)
    assert a["input_ids"].shape == (3, 17) and torch.equal(a["input_ids"], b["input_ids"])
    assert bool(a["attention_mask"].all())  # no padding
    assert int(a["input_ids"].min()) >= 1000
    assert not torch.equal(a["input_ids"], fixed_inputs(30522, 3, 17, seed=2)["input_ids"])


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


def test_latency_sweep_rows_and_bound(tiny_bert):
    res = latency_sweep(tiny_bert, [0.5], [1], [8, 16], repeats=2, warmup=0, multiples=[8], progress=False)
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
    table = markdown_table(res)
    assert table.count("\n") == 3 and "| 50% | 19 |" in table
    with pytest.raises(UserError, match="positions"):
        latency_sweep(tiny_bert, [0.5], [1], [TINY["positions"] + 1], progress=False)


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
    assert (out / "speedup_cpu.png").stat().st_size > 0
    assert not (tmp_path / "bench.partial.json").exists()  # progress file removed when the run completes
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
