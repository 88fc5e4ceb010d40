"""benchmarks/kwon.py: Kwon et al. 2022 reimplemented as a peer (issue 25, item 5): its search keeps the FLOPs
budget and takes the most important split of it, its rearrangement sees interactions, its mask tuning finds
scales that are known, and the peers benchmark runs it beside ours at tiny size."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from anatomy_prune import load_model
from anatomy_prune.evaluate.cost import flops_cost
from anatomy_prune.models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.step import copy_loaded
from anatomy_prune.scores.calibration import make_calibration

from conftest import make_classifier
from test_paths import bench


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_search_keeps_the_budget_and_takes_the_most_important_split():
    kwon = bench("kwon")
    torch.manual_seed(0)
    heads = [torch.diag(torch.rand(4, dtype=torch.float64)) for _ in range(3)]
    neurons = [torch.diag(torch.rand(10, dtype=torch.float64) / 5) for _ in range(3)]
    cost = SimpleNamespace(per_head=[7.0] * 3, per_neuron=[2.0] * 3, base=10.0, dense=10.0 + 3 * 28 + 3 * 20)
    for f in (0.8, 0.5, 0.3):
        h, n = kwon.search_flops(heads, neurons, cost, f)
        used = 10 + 7 * sum(map(len, h)) + 2 * sum(map(len, n))
        assert used <= f * cost.dense + 1e-9
        got = sum(float(heads[i][j, j]) for i, ks in enumerate(h) for j in ks) + \
            sum(float(neurons[i][j, j]) for i, ks in enumerate(n) for j in ks)
        # brute force over the number of heads: the best total importance that fits
        hs = sorted((float(x) for m in heads for x in m.diagonal()), reverse=True)
        ns = sorted((float(x) for m in neurons for x in m.diagonal()), reverse=True)
        best = max(sum(hs[:k]) + sum(ns[:max(0, min(30, int((f * cost.dense - 10 - 7 * k) // 2)))])
                   for k in range(1, 13) if f * cost.dense - 10 - 7 * k >= 0)
        assert got == pytest.approx(best)
    with pytest.raises(ValueError, match="no room"):
        kwon.search_flops(heads, neurons, cost, 0.05)


def test_rearrangement_sees_interactions_within_a_layer():
    kwon = bench("kwon")
    # units 0 and 2 are alike (their gradients move together), so removing both costs more than their diagonals
    fisher = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.5]], dtype=torch.float64)
    assert kwon.rearrange(fisher, [1]) == [2]          # the diagonal alone keeps unit 1; removing 0 and 1 is cheaper
    assert kwon.rearrange(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)), [0, 2]) == [0, 2]
    assert kwon.rearrange(fisher, []) == [] and kwon.rearrange(fisher, [0, 1, 2]) == [0, 1, 2]


def test_mask_tuning_recovers_a_known_scale(monkeypatch):
    """A copy of the dense model with one head's and one neuron's output scaled down: the tuning, undamped,
    finds the scales that undo it (the dense weights come back), and leaves the first block's heads alone."""
    kwon = bench("kwon")
    monkeypatch.setattr(kwon, "LSMR_DAMP", 0.0)       # a tiny model's Grams are small: damping 1 would hold them
    clf = make_classifier("tiny-bert")
    cal = make_calibration(clf, 8, max_length=32)
    work = copy_loaded(clf)
    base = base_model(work.model)
    att, ffn = attention_sites(work.model)[1], ffn_sites(work.model)[0]
    o, down = weight_out_in(get_module(base, att.o)), weight_out_in(get_module(base, ffn.down))
    with torch.no_grad():
        o[:, att.head_dim:2 * att.head_dim] *= 0.5
        down[:, 3] *= 0.25
    report = kwon.tune_masks(work, clf, cal)
    assert {(t["layer"], t["kind"]) for t in report["tuned"]} >= {(1, "heads"), (0, "neurons")}
    # a random tiny model's readout token hardly varies over 8 reviews: the last block's neurons are not
    # determined there, and the tuning stops before them, as the paper's does on a failed solve
    assert report["stopped_at"] in (None, {"layer": 2, "kind": "neurons", "max_abs_scale": None})
    assert all(t["layer"] > 0 for t in report["tuned"] if t["kind"] == "heads")
    for a, b in zip(work.model.parameters(), clf.model.parameters()):
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-3)


def test_the_damped_solve_keeps_a_poorly_determined_scale_near_one():
    kwon = bench("kwon")
    gram = torch.diag(torch.tensor([1e4, 1e-3], dtype=torch.float64))
    x = kwon._lsmr(gram, torch.tensor([2e4, 5e-3], dtype=torch.float64))    # undamped: 2 and 5
    assert x[0] == pytest.approx(2.0, rel=1e-3) and x[1] == pytest.approx(1.0, abs=1e-3)


def test_peers_benchmark_runs_kwon_beside_ours_at_tiny_size(tmp_path):
    clf = str(save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32))
    assert bench("peers").main(["--model", clf, "--eval-size", "16", "--calib-size", "8", "--targets", "2",
                                "--target-kind", "flops", "--peers", "kwon", "kwon-untuned", "--kwon-flops", "0.6", "0.35",
                                "--repeats", "1", "--out", str(tmp_path / "p")]) == 0
    rows = json.loads((tmp_path / "p" / "peers.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "ours", "ours + int8"] + ["kwon", "kwon + int8"] * 2 + \
        ["kwon-untuned", "kwon-untuned + int8"] * 2
    cm = flops_cost(load_model(clf, device="cpu"), seq_len=128)
    kw = [r for r in rows if r["method"] in ("kwon", "kwon-untuned")]
    for r in kw:
        assert cm.predict(r["ffn_widths"], r["heads"]) <= r["flops"] * cm.dense * (1 + 1e-9) and "vs_ours" in r
    assert [(r["ffn_widths"], r["heads"]) for r in kw[:2]] == [(r["ffn_widths"], r["heads"]) for r in kw[2:]]  # one search
    assert "| kwon | FLOPs 0.35 |" in (tmp_path / "p" / "table.md").read_text()
    assert bench("peers").main(["--model", clf, "--peers", "kwon", "--kwon-flops", "1.5", "--out", str(tmp_path / "q")]) == 2
    assert bench("peers").main(["--model", clf, "--peers", "kwan", "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
