"""Constraints rather than sparsities: cost models (FLOPs exact, latency fitted from timings), the budget
allocator, and int8 quantization stacked on pruning (saved and reloaded)."""
from __future__ import annotations

import json

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.cli import main
from anatomy_prune.evaluate.cost import flops_cost, latency_cost
from anatomy_prune.evaluate.counts import count_params, flops_per_token
from anatomy_prune.models.quantize import is_quantized_linear, quantize_int8
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.plan.allocate import keep_under_budget
from anatomy_prune.scores.calibration import Calibration

from conftest import TEXTS, make_classifier


def test_flops_cost_model_is_exact_for_ffn_widths():
    loaded = load_model("tiny-bert", device="cpu")
    cm = flops_cost(loaded, seq_len=128)
    assert cm.dense == pytest.approx(flops_per_token(loaded.model, 128))
    calib = Calibration(loaded, [], seed=0)
    pruned = prune_step(calib, PruneRequest(method="magnitude", sparsity=0.5)).loaded
    from anatomy_prune.models.families import ffn_widths
    assert cm.predict(ffn_widths(pruned.model)) == pytest.approx(flops_per_token(pruned.model, 128))


def test_budget_allocator_meets_the_budget_lowest_score_per_cost_first():
    g = torch.Generator().manual_seed(0)
    values = {"neurons": [torch.rand(20, generator=g), torch.rand(20, generator=g) + 1.0],
              "heads": [torch.rand(4, generator=g) * 4, torch.rand(4, generator=g) * 4]}
    costs = {"neurons": [1.0, 1.0], "heads": [6.0, 6.0]}
    kept = keep_under_budget(values, costs, base=10.0, budget=50.0)
    cost = 10 + sum(kept["neurons"]) * 1.0 + sum(kept["heads"]) * 6.0
    assert cost <= 50.0 and cost > 50.0 - 6.0           # met, and not by much more than one unit
    assert kept["neurons"][0] < kept["neurons"][1]      # layer 1's neurons score higher: it keeps more
    with pytest.raises(UserError, match="at most"):
        keep_under_budget(values, costs, base=10.0, budget=5.0)
    floor = keep_under_budget(values, costs, base=10.0, budget=40.0, floor=0.25)  # floors cost 10 + 10 + 12
    assert min(floor["neurons"]) >= 5 and min(floor["heads"]) >= 1


def test_latency_cost_model_is_fitted_from_timings():
    loaded = load_model("tiny-bert", device="cpu")
    cm = latency_cost(loaded, batch_size=2, seq_len=16, repeats=2)
    assert cm.kind == "latency" and cm.dense > 0 and cm.base >= 0
    assert {"dense", "ffn0.5", "ffn0.25"} <= set(cm.info["timed"])
    assert all(v["median_s"] > 0 for v in cm.info["timed"].values())


def test_int8_stacked_on_pruning_saves_and_reloads(tmp_path):
    clf = make_classifier("tiny-gpt2")  # Conv1D projections: turned into Linear, then quantized
    calib = Calibration(clf, TEXTS * 2, [1, 0, 1, 0] * 2, max_length=32, batch_size=4)
    res = prune_step(calib, PruneRequest(method="calibrated", sparsity=0.5, quantize="int8"), keep_float=True)
    q = res.loaded.model
    assert res.quantize == "int8" and sum(is_quantized_linear(m) for m in q.modules()) >= 6
    enc = clf.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out_q = q(**enc)
        out_f = res.float_loaded.model(**enc)
    assert torch.allclose(out_q, out_f, atol=0.2) and not torch.equal(out_q, out_f)
    assert count_params(q) == count_params(res.float_loaded.model)  # int8 weights are counted too
    folder = save_model(res.float_loaded, tmp_path / "m", plan=res.plan.to_dict(), quantize="int8")
    again = load_model(str(folder), device="cpu")
    assert any(is_quantized_linear(m) for m in again.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(again.model(**enc), out_q)


def test_quantize_refuses_a_gpu_and_unknown_kinds(tmp_path):
    from anatomy_prune.models.quantize import check_quantize
    with pytest.raises(UserError, match="device cpu"):
        check_quantize("int8", torch.device("cuda"))
    with pytest.raises(UserError, match="unknown --quantize"):
        check_quantize("int4", torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it: one line, exit status 2
        main(["prune", "--model", "tiny-bert", "--method", "magnitude", "--sparsity", "0.5", "--quantize", "int4",
              "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert not (tmp_path / "x").exists()


def test_int8_keeps_the_ffn_output_projections_float_and_int8_all_none():
    """int8 quantizes every non-empty Linear but the FFN output projections (their inputs' outliers cost
    all-mpnet-base-v2 36 points under int8-all); int8-all quantizes every one; a saved folder reloads the recipe."""
    from anatomy_prune.models.families import base_model, ffn_sites, get_module
    from anatomy_prune.models.quantize import float_layers

    clf = make_classifier("tiny-bert")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in clf.model.modules())
    every = quantize_int8(make_classifier("tiny-bert").model, "int8-all")
    assert sum(is_quantized_linear(m) for m in every.modules()) == n_linear
    downs = {get_module(base_model(clf.model), s.down) for s in ffn_sites(clf.model)}
    kept = float_layers(clf.model, "int8")
    assert len(kept) == len(downs) == 3 and all(n.endswith("output.dense") and "attention" not in n for n in kept)
    q = quantize_int8(clf.model, "int8")
    assert sum(is_quantized_linear(m) for m in q.modules()) == n_linear - 3
    assert all(type(m) is torch.nn.Linear for name, m in q.named_modules() if name in kept)
    with pytest.raises(UserError, match="unknown int8 recipe"):
        quantize_int8(make_classifier("tiny-bert").model, "int4")


def test_a_saved_int8_all_folder_reloads_every_linear_quantized(tmp_path):
    for recipe, left_float in (("int8-all", 0), ("int8", 3)):     # tiny-bert: 3 FFNs
        folder = save_model(make_classifier("tiny-bert"), tmp_path / recipe, quantize=recipe)
        again = load_model(str(folder), device="cpu")
        plain = [m for m in again.model.modules() if type(m) is torch.nn.Linear and m.weight.numel() > 0]
        assert len(plain) == left_float and sum(is_quantized_linear(m) for m in again.model.modules()) > 10


def test_prune_to_a_flops_target_removes_heads_and_neurons(tmp_path, tiny_csv):
    from anatomy_prune.models.saved import save_model
    clf = save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32)
    out = tmp_path / "t"
    assert main(["prune", "--model", str(clf), "--target-flops", "0.6", "--out", str(out), "--data", str(tiny_csv),
                 "--calib-size", "16", "--eval-size", "24", "--batch-size", "8", "--target-batch", "4",
                 "--target-length", "32"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "physical" and m["heads_removed"] > 0
    assert m["flops_ratio"] <= 0.6 + 1e-9 and m["measured_speedup"] > 0
    cm = json.loads((out / "cost_model.json").read_text())
    assert cm["kind"] == "flops" and cm["predicted"] <= cm["budget"]
    again = load_model(str(out), device="cpu")                      # per-layer heads and widths reload
    from anatomy_prune.models.families import head_counts
    assert head_counts(again.model) == [len(h) for h in json.loads((out / "plan.json").read_text())["heads"]]


def test_an_unreachable_target_names_the_best_reachable(tmp_path, tiny_csv, capsys):
    from anatomy_prune.models.saved import save_model
    clf = save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32)
    args = ["prune", "--model", str(clf), "--out", str(tmp_path / "t"), "--data", str(tiny_csv),
            "--calib-size", "16", "--eval-size", "24", "--floor", "0.5"]
    assert main([*args, "--target-flops", "0.05"]) == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("anatomy-prune")]
    assert len(err) == 1 and "at most" in err[0] and "ask for less" in err[0]
    assert not (tmp_path / "t").exists()
    assert main([*args, "--target-flops", "0.5", "--sparsity", "0.5"]) == 2
    assert main([*args, "--target-speedup", "0.8"]) == 2
    assert not (tmp_path / "t").exists()


def test_sweep_targets_and_int8(tmp_path, tiny_csv):
    from anatomy_prune.pipeline.sweep import run_sweep
    from anatomy_prune.models.saved import save_model
    clf = save_model(make_classifier("tiny-gpt2"), tmp_path / "clf", max_length=32)
    from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, SweepConfig
    cfg = SweepConfig(model=str(clf), methods=["magnitude"], sparsities=[0.5], mode="physical",
                      eval=EvalSpec(data=str(tiny_csv), size=24), calib=CalibSpec(size=8), targets=[{"flops": 0.7}],
                      quantize="int8", figures=False)
    rows = run_sweep(cfg, tmp_path / "sw", progress=False)
    t = [r for r in rows if r.get("target")]
    assert len(t) == 1 and t[0]["heads_removed"] > 0 and t[0]["quantize"] == "int8"
    assert t[0]["predicted_cost_ratio"] <= 0.7 + 1e-9


def test_head_compensation_rebuilds_duplicated_heads_exactly():
    """Head 1 made a copy of head 0 (same q, k, v rows): removing head 1, the refit moves its output onto
    head 0's columns of the output projection, so the output is unchanged; a no-op refit would not be."""
    from anatomy_prune.models.families import attention_sites, base_model, get_module, weight_out_in
    from anatomy_prune.plan.plan import PruningPlan
    from anatomy_prune.models.families import ffn_widths, head_counts

    clf = make_classifier("tiny-bert")
    base = base_model(clf.model)
    with torch.no_grad():
        for site in attention_sites(clf.model):
            hd = site.head_dim
            for path in (site.q, site.k, site.v):
                mod = get_module(base, path)
                weight_out_in(mod)[hd:2 * hd] = weight_out_in(mod)[:hd]
                mod.bias[hd:2 * hd] = mod.bias[:hd]
    widths, heads = ffn_widths(clf.model), head_counts(clf.model)
    plan = PruningPlan(keep=[list(range(w)) for w in widths], widths=widths,
                       heads=[[h for h in range(n) if h != 1] for n in heads], head_widths=heads,
                       params={"ridge": 1e-7})
    calib = Calibration(clf, TEXTS * 3, [1, 0, 1, 0] * 3, max_length=24, batch_size=4)
    enc = clf.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense = clf.model(**enc)
    plain = prune_step(calib, PruneRequest(plan=plan))
    comp = prune_step(calib, PruneRequest(plan=plan, compensate=True))
    assert comp.compensation["heads_rel_err_removed"] > 0.05
    assert comp.compensation["heads_rel_err_compensated"] < 1e-3 * comp.compensation["heads_rel_err_removed"]
    with torch.no_grad():
        e_plain = (plain.loaded.model(**enc) - dense).abs().max()
        e_comp = (comp.loaded.model(**enc) - dense).abs().max()
    assert e_comp < 1e-2 * e_plain


def test_latency_fit_predicts_shapes_it_was_not_fitted_on():
    """The fit on the shapes latency_cost times (dense, FFN-only, heads-only), from noisy timings of a known
    linear cost (1% noise), predicts the held-back shapes (both kinds pruned at once) within 5% (over 200 noise
    draws the worst was 4.3%, the median 1.1%); a fit without per-unit costs would be off by about 50%."""
    from anatomy_prune.evaluate.cost import HELD_BACK, fit_latency

    g = torch.Generator().manual_seed(0)
    truth = lambda n, h: 0.02 + 3e-5 * n + 4e-4 * h  # noqa: E731
    fitted = [(888, 48), (444, 48), (222, 48), (888, 24), (888, 12)]
    noisy = [truth(n, h) * (1 + 0.01 * float(torch.randn(1, generator=g))) for n, h in fitted]
    base, a_n, a_h = fit_latency(fitted, noisy)
    for f_n, f_h in HELD_BACK:
        n, h = round(888 * f_n), round(48 * f_h)
        assert base + a_n * n + a_h * h == pytest.approx(truth(n, h), rel=0.05)
    assert fit_latency([(888, 48), (444, 48)], [2.0, 1.0])[2] == 0.0        # heads never vary: no head term
    with pytest.raises(UserError, match="pruned shape"):
        fit_latency([(888, 48)] * 3, [1.0, 1.0, 1.0])


def test_latency_cost_reports_its_error_on_held_back_shapes():
    loaded = load_model("tiny-bert", device="cpu")
    cm = latency_cost(loaded, batch_size=2, seq_len=16, repeats=2)
    held = {k: v for k, v in cm.info["timed"].items() if not v["fitted"]}
    assert len(held) == 2 and all(v["neurons"] < 111 and v["heads"] < 12 for v in held.values())
    for v in held.values():
        assert v["predicted_s"] == pytest.approx(cm.predict([v["neurons"] / 3] * 3, [v["heads"] / 3] * 3), rel=1e-9)
        assert v["rel_error"] == pytest.approx((v["predicted_s"] - v["median_s"]) / v["median_s"])
    assert cm.info["held_back_max_rel_error"] == max(abs(v["rel_error"]) for v in held.values())


def test_units_that_cost_nothing_are_all_kept():
    """A kind (or a layer) whose units cost 0 under the cost model is never pruned (removing it saves
    nothing); the budget is met by the others, and a budget below the base is out of reach."""
    g = torch.Generator().manual_seed(1)
    values = {"neurons": [torch.rand(10, generator=g), torch.rand(10, generator=g)],
              "heads": [torch.rand(4, generator=g), torch.rand(4, generator=g)]}
    kept = keep_under_budget(values, {"neurons": [1.0, 0.0], "heads": [0.0, 0.0]}, base=5.0, budget=10.0)
    assert kept["heads"] == [4, 4] and kept["neurons"][1] == 10 and kept["neurons"][0] == 5
    with pytest.raises(UserError, match="out of reach"):
        keep_under_budget(values, {"neurons": [0.0, 0.0], "heads": [0.0, 0.0]}, base=5.0, budget=4.0)


def test_a_saved_latency_model_gives_the_same_plan_without_timing(tmp_path, monkeypatch):
    """--cost-model: the latency model a target run wrote is reused (no timing at all), so the same request
    gives the same plan; a model or shape it was not fitted for is refused in one line."""
    import anatomy_prune.pipeline.target as step

    loaded = make_classifier("tiny-bert")
    calib = Calibration(loaded, TEXTS * 2, [i % 2 for i in range(2 * len(TEXTS))], max_length=24)
    fitted = latency_cost(loaded, batch_size=4, seq_len=16, repeats=1).to_dict()
    # the tiny model's time is mostly overhead; costs of a model where pruning pays keep the target reachable
    saved = {**fitted, "base": 1.0, "per_neuron": [0.01] * len(fitted["neurons"]), "per_head": [0.1] * len(fitted["heads"])}
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(step, "latency_cost", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed again")))
    req = dict(method="calibrated", target={"speedup": 1.5, "batch_size": 4, "seq_len": 16, "cost_model": str(path)})
    first, again = prune_step(calib, PruneRequest(**req)), prune_step(calib, PruneRequest(**req))
    assert first.cost_model["predicted"] <= first.cost_model["dense"] / 1.5
    assert again.plan.keep == first.plan.keep and again.plan.heads == first.plan.heads
    with pytest.raises(UserError, match="fitted at batch x length 4 x 16"):
        prune_step(calib, PruneRequest(**{**req, "target": {**req["target"], "seq_len": 32}}))
    other = make_classifier("tiny-gpt2")
    with pytest.raises(UserError, match="not this model's"):
        prune_step(Calibration(other, TEXTS, [i % 2 for i in range(len(TEXTS))], max_length=24), PruneRequest(**req))
    with pytest.raises(UserError, match="goes with --target-speedup"):
        PruneRequest(method="calibrated", target={"flops": 0.5, "cost_model": str(path)})
    path.write_text(json.dumps({**saved, "base": -1.0}))
    with pytest.raises(UserError, match="non-negative"):
        prune_step(calib, PruneRequest(**req))


def test_cost_model_without_a_speedup_target_is_one_line(tmp_path, capsys):
    assert main(["prune", "--model", "tiny-bert", "--method", "magnitude", "--sparsity", "0.5",
                 "--cost-model", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "goes with --target-speedup" in err[0] and not (tmp_path / "o").exists()


def _fake_latency(loaded, **_k):
    """A latency model where pruning pays (the tiny model's real time is mostly overhead)."""
    from anatomy_prune.evaluate.cost import CostModel, _attention_shape, model_signature
    from anatomy_prune.models.families import ffn_widths
    neurons, heads = ffn_widths(loaded.model), _attention_shape(loaded.model)[0]
    return CostModel("latency", 1.0, [0.01] * len(neurons), [0.1] * len(heads), neurons, heads,
                     {"batch_size": 4, "seq_len": 16, "model": model_signature(loaded)})


def test_a_speedup_plan_is_timed_and_corrected_then_replays_without_timing(tmp_path, monkeypatch):
    """The check: a plan that runs 15% slower than its latency model says is timed, its budget scaled, and the
    plan made again until it measures within CHECK_TOLERANCE (3%) of the target; the scale is recorded, so reusing
    the cost model gives that plan with no timing. A stub that never corrects (or never times) fails the asserts."""
    import anatomy_prune.pipeline.target as target

    calls = []

    def slow_by_15(loaded, plan, batch_size, seq_len, repeats=5):
        cm = _fake_latency(loaded)
        calls.append(plan)
        speedup = cm.dense / (1.15 * cm.predict(plan.kept_widths, plan.kept_heads))
        return {"speedup": speedup, "q1": speedup, "q3": speedup}

    monkeypatch.setattr(target, "latency_cost", _fake_latency)
    monkeypatch.setattr(target, "measured_speedup", slow_by_15)
    loaded = make_classifier("tiny-bert")
    calib = Calibration(loaded, TEXTS * 2, [i % 2 for i in range(2 * len(TEXTS))], max_length=24)
    req = dict(method="calibrated", target={"speedup": 1.5, "batch_size": 4, "seq_len": 16, "floor": 0.25})
    res = prune_step(calib, PruneRequest(**req))
    rounds = res.cost_model["checked"]
    assert 2 <= len(rounds) <= target.CHECK_ROUNDS and len(calls) == len(rounds) + 1   # the last one confirmed
    assert len(rounds[-1]["readings"]) == 2 and "readings" not in rounds[0]
    assert rounds[0]["speedup"] == pytest.approx(rounds[0]["predicted_speedup"] / 1.15)
    assert abs(rounds[-1]["speedup"] / 1.5 - 1) <= target.CHECK_TOLERANCE
    scale = res.cost_model["info"]["budget_scale"]["1.5"]
    assert scale == pytest.approx(1 / 1.15, rel=0.03) and res.cost_model["budget"] == pytest.approx(
        scale * res.cost_model["dense"] / 1.5)
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps(res.cost_model, default=float))
    monkeypatch.setattr(target, "measured_speedup", lambda *a, **k: pytest.fail("timed again"))
    monkeypatch.setattr(target, "latency_cost", lambda *a, **k: pytest.fail("fitted again"))
    again = prune_step(calib, PruneRequest(method="calibrated", target={**req["target"], "cost_model": str(path)}))
    assert again.plan.keep == res.plan.keep and again.plan.heads == res.plan.heads and "checked" not in again.cost_model
    unchecked = prune_step(calib, PruneRequest(method="calibrated",
                                               target={**req["target"], "speedup": 1.4, "cost_model": str(path)}))
    assert "checked" not in unchecked.cost_model      # another target on a reused model: not timed unless asked
    path.write_text(json.dumps({**res.cost_model, "info": {**res.cost_model["info"], "budget_scale": {"1.5": "x"}}}))
    with pytest.raises(UserError, match="budget_scale"):
        prune_step(calib, PruneRequest(method="calibrated", target={**req["target"], "cost_model": str(path)}))


def test_a_reading_inside_the_tolerance_is_confirmed_and_a_lucky_one_corrected(monkeypatch):
    """One timing can be 10% off: a first reading inside the tolerance is read again, and the plan's speedup is
    the two readings' mean; here the mean is 6% short, so the budget is corrected and the next plan timed."""
    import anatomy_prune.pipeline.target as target

    readings = iter([1.52, 1.30, 1.49, 1.50])
    monkeypatch.setattr(target, "latency_cost", _fake_latency)
    monkeypatch.setattr(target, "measured_speedup", lambda *a, **k: dict(zip(("speedup", "q1", "q3"), [next(readings)] * 3)))
    loaded = make_classifier("tiny-bert")
    calib = Calibration(loaded, TEXTS * 2, [i % 2 for i in range(2 * len(TEXTS))], max_length=24)
    res = prune_step(calib, PruneRequest(method="calibrated", target={"speedup": 1.5, "batch_size": 4, "seq_len": 16,
                                                                      "floor": 0.25}))
    rounds = res.cost_model["checked"]
    assert [r["readings"] for r in rounds] == [[1.52, 1.30], [1.49, 1.50]]
    assert rounds[0]["speedup"] == pytest.approx(1.41) and rounds[1]["speedup"] == pytest.approx(1.495)
    assert rounds[1]["budget_scale"] == pytest.approx(1.41 / 1.5)
    assert res.cost_model["info"]["budget_scale"]["1.5"] == pytest.approx(1.41 / 1.5)


def test_the_check_can_be_turned_off_and_takes_a_bool_for_speedup_only(monkeypatch):
    import anatomy_prune.pipeline.target as target

    monkeypatch.setattr(target, "latency_cost", _fake_latency)
    monkeypatch.setattr(target, "measured_speedup", lambda *a, **k: pytest.fail("timed"))
    loaded = make_classifier("tiny-bert")
    calib = Calibration(loaded, TEXTS * 2, [i % 2 for i in range(2 * len(TEXTS))], max_length=24)
    res = prune_step(calib, PruneRequest(method="calibrated", target={"speedup": 1.5, "batch_size": 4, "seq_len": 16,
                                                                      "check": False}))
    assert "checked" not in res.cost_model and "budget_scale" not in res.cost_model["info"]
    for bad in ({"speedup": 1.5, "check": "yes"}, {"flops": 0.5, "check": True}):
        with pytest.raises(UserError, match="check"):
            PruneRequest(method="calibrated", target=bad)


def test_the_check_times_the_real_plan_on_tiny_bert(monkeypatch):
    """The plan's shapes are really timed against dense (the tiny model's time is mostly overhead, so its latency
    model is the fake one where pruning pays); each round is recorded with its quartiles."""
    import anatomy_prune.pipeline.target as target

    monkeypatch.setattr(target, "latency_cost", _fake_latency)
    loaded = make_classifier("tiny-bert")
    calib = Calibration(loaded, TEXTS * 2, [i % 2 for i in range(2 * len(TEXTS))], max_length=24)
    res = prune_step(calib, PruneRequest(method="magnitude", target={"speedup": 1.2, "batch_size": 4, "seq_len": 16,
                                                                     "floor": 0.25}))
    rounds = res.cost_model["checked"]
    assert 1 <= len(rounds) <= target.CHECK_ROUNDS
    assert all(r["speedup"] > 0 and r["q1"] <= r["q3"] and r["predicted_speedup"] >= 1.0 - 1e-9 for r in rounds)
    assert res.cost_model["info"]["budget_scale"]["1.2"] in [r["budget_scale"] for r in rounds]


def test_check_speedup_without_a_speedup_target_is_one_line(tmp_path, capsys):
    assert main(["prune", "--model", "tiny-bert", "--method", "magnitude", "--sparsity", "0.5", "--no-check-speedup",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "go with --target-speedup" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_latency_cost_times_the_units_on_a_few_blocks_and_the_base_on_the_whole_model(monkeypatch, alias):
    """A deep enough model has its pruned shapes timed on a copy of its first blocks; the whole dense model, timed in
    the same rounds, sets the base, so the cost model predicts the whole model's time; the model is left as it was."""
    from anatomy_prune.evaluate import cost
    from anatomy_prune.models.families import ffn_widths

    monkeypatch.setattr(cost, "STUB_LAYERS", 1)                 # the tiny models' 3 blocks >= 2 x 1
    loaded = load_model(alias, device="cpu")
    before = [p.detach().clone() for p in loaded.model.parameters()]
    cm = latency_cost(loaded, batch_size=2, seq_len=16, repeats=2)
    assert cm.info["timed_blocks"] == 1 and ffn_widths(loaded.model) == cm.neurons and len(cm.neurons) == 3
    assert cm.info["timed"]["dense"]["neurons"] == cm.neurons[0]          # the shapes: one block's units
    whole = cm.info["timed"]["whole"]["median_s"]
    if cm.base > 0:
        assert cm.dense == pytest.approx(whole, rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))
