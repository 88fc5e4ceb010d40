"""Scores only score: allocation and compensation are the request's options, resolved over each method's
defaults in one place (pipeline.allocation.resolve); older parameter spellings (a TOML row, params=) map onto
Allocation and Compensation; the allocator's normalisations; a refit asked by the request removes error."""
from __future__ import annotations

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.linalg import DEFAULT_RIDGE
from anatomy_prune.pipeline.allocation import Allocation, check_for, resolve, split_params, takes
from anatomy_prune.pipeline.compensation import Compensation
from anatomy_prune.pipeline.requests import PruneRequest, SweepConfig
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.pipeline.sweep_schema import grid_points
from anatomy_prune.plan import keep_counts, plan_from_scores
from anatomy_prune.scores import Scores, score
from anatomy_prune.scores.calibrated import DEFAULT_READOUT_MIX, auto_floor

from conftest import make_classifier
from test_compensate import calib

LOCAL = {"kind": "local"}


@pytest.mark.parametrize("method,options,sparsity,allocation", [
    ("random", {}, 0.5, LOCAL),
    ("magnitude", {}, 0.5, LOCAL),
    ("activation", {}, 0.3, LOCAL),
    ("strategy", {"alpha": 0.1, "rule": "paper"}, None, {"kind": "threshold"}),
    ("strategy", {"alpha": None, "rule": "paper"}, 0.4, {"kind": "global", "normalize": "none", "floor": 0.0}),
    ("strategy", {"alpha": None, "rule": "uniform"}, 0.4, LOCAL),
    ("calibrated", {}, 0.5, {"kind": "global", "normalize": "none", "floor": 0.2}),
    ("calibrated", {}, 0.9, {"kind": "global", "normalize": "none", "floor": auto_floor(0.9)}),
])
def test_each_methods_defaults(method, options, sparsity, allocation):
    """The defaults of every method, from the one resolver; only calibrated compensates by default."""
    how = resolve(method, options, sparsity, Allocation(), None, readout=True)
    assert how.allocation == allocation
    if method == "calibrated":
        assert how.recipe == {"kind": "refit", "ridge": DEFAULT_RIDGE, "readout_mix": DEFAULT_READOUT_MIX,
                              "tune": False, "own": True}
        assert how.record == {"floor_auto": True, "compensate": True, "ridge": DEFAULT_RIDGE,
                              "readout_mix": DEFAULT_READOUT_MIX}
        lm = resolve(method, options, sparsity, Allocation(), None, readout=False, causal=True)
        assert lm.recipe["readout_mix"] == 0.0 == lm.record["readout_mix"]    # no readout token: no mix
        assert lm.recipe["tune"] is True is lm.record["tune"]                 # a causal LM: tuned
    else:
        assert how.recipe is None and how.record == {}


def test_what_the_request_gives_beats_the_default():
    alloc = Allocation(floor=0.05, normalize="standard", multiple_of=8, head_sparsity=0.25)
    how = resolve("calibrated", {}, 0.5, alloc, Compensation(ridge=0.3), readout=True)
    assert how.allocation == {"kind": "global", "normalize": "standard", "floor": 0.05, "multiple_of": 8,
                              "head_sparsity": 0.25}
    assert how.recipe == {"kind": "refit", "ridge": 0.3, "readout_mix": DEFAULT_READOUT_MIX, "tune": False, "own": True}
    assert how.record == {"floor_auto": False, "compensate": True, "ridge": 0.3, "readout_mix": DEFAULT_READOUT_MIX}
    bias = resolve("calibrated", {}, 0.5, Allocation(), Compensation(kind="bias"), readout=True)
    assert bias.recipe == {"kind": "bias", "tune": False, "own": True} and bias.record["compensation"] == "bias"
    glob = resolve("magnitude", {}, 0.5, Allocation(scope="global", floor=0.1), Compensation(), readout=True)
    assert glob.allocation == {"kind": "global", "floor": 0.1}
    assert glob.recipe == {"kind": "refit", "ridge": DEFAULT_RIDGE, "readout_mix": 0.0, "tune": False, "own": False}
    assert glob.record == {}   # a recipe the request chose is the request's: the plan does not record it
    assert resolve("strategy", {"alpha": 0.1}, None, Allocation(multiple_of=4), None).allocation == \
        {"kind": "threshold", "multiple_of": 4}


def test_refusals_are_kept():
    for method, alloc, msg in [("strategy", Allocation(floor=0.1), "takes no --floor"),
                               ("strategy", Allocation(scope="global"), "takes no --allocation"),
                               ("strategy", Allocation(normalize="mean"), "takes no --normalize"),
                               ("calibrated", Allocation(scope="local"), "takes no --allocation"),
                               ("activation", Allocation(head_sparsity=0.2), "takes no --head-sparsity")]:
        with pytest.raises(UserError, match=msg):
            check_for(method, alloc)
    check_for("calibrated", Allocation(floor=0.1, multiple_of=8, normalize="mean", head_sparsity=0.2),
              Compensation(kind="bias"))
    assert "head_sparsity" not in takes("activation") and "head_sparsity" in takes("magnitude") and "multiple_of" in takes("strategy")
    for build, msg in [
        (lambda: Allocation(normalize="max"), "--normalize"),
        (lambda: Allocation(head_sparsity=1.0), "--head-sparsity"),
        (lambda: Compensation(kind="magic"), "--compensation"),
        (lambda: Compensation(kind="bias", ridge=0.1), "no ridge"),
        (lambda: PruneRequest(method="calibrated", sparsity=0.5, params={"ridge": 0.1},
                              compensation=Compensation(ridge=0.2)), "once"),
        (lambda: PruneRequest(method="calibrated", sparsity=0.5, layerwise="sequential", params={"readout_mix": 0.1}),
         "not readout_mix"),
        (lambda: PruneRequest(method="calibrated", sparsity=0.5, layerwise="sequential",
                              compensation=Compensation(kind="bias")), "not compensation"),
    ]:
        with pytest.raises(UserError, match=msg) as exc:
            build()
        assert len(str(exc.value).splitlines()) == 1


def test_old_params_map_onto_allocation_and_compensation():
    split = split_params({"beta": 0.5, "floor": 0.1, "allocation": "global", "normalize": "standard",
                          "multiple_of": 4, "head_sparsity": 0.2, "ridge": 0.3, "readout_mix": 0.1})
    assert split.params == {"beta": 0.5}
    assert split.allocation == Allocation(scope="global", floor=0.1, normalize="standard", multiple_of=4,
                                          head_sparsity=0.2)
    assert split.compensation == Compensation(ridge=0.3, readout_mix=0.1)
    assert split_params({"alpha": 0.1}) == ({"alpha": 0.1}, None, None)
    req = PruneRequest(method="calibrated", sparsity=0.5, params={"floor": 0.3, "ridge": 0.2, "head_sparsity": 0.25})
    assert req.params == {} and req.allocation == Allocation(floor=0.3, head_sparsity=0.25)
    assert req.compensation == Compensation(ridge=0.2)
    assert req.scorer_params() == {"heads": True, "ridge": 0.2}   # heads scored; one ridge for score and refit
    assert req.settings()["params"] == {"floor": 0.3, "head_sparsity": 0.25, "ridge": 0.2}   # as recorded before
    assert PruneRequest(method="magnitude", sparsity=0.5, compensate=True).compensation == Compensation()


def test_old_params_in_a_toml_row_map_onto_the_request(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('model = "tiny-bert"\nmethods = []\nsparsities = []\n'
                    '[[row]]\nmethod = "magnitude"\nsparsity = 0.5\nallocation = "global"\nfloor = 0.1\n'
                    'normalize = "standard"\nmultiple_of = 4\nridge = 0.2\n'
                    '[[row]]\nmethod = "calibrated"\nsparsity = 0.4\nfloor = 0.3\nreadout_mix = 0.1\nhead_sparsity = 0.25\n'
                    '[[row]]\nmethod = "strategy"\nalpha = 0.2\nmultiple_of = 8\n')
    cfg = SweepConfig.from_toml(grid)
    reqs = [cfg.point_request(p) for p in grid_points(cfg.grid, load_model("tiny-bert", device="cpu"))]
    mag, cal, strat = reqs
    assert mag.params == {} and mag.compensation == Compensation(ridge=0.2)
    assert mag.allocation == Allocation(scope="global", floor=0.1, normalize="standard", multiple_of=4)
    assert cal.allocation == Allocation(floor=0.3, head_sparsity=0.25)
    assert cal.compensation == Compensation(readout_mix=0.1)
    assert strat.params == {"alpha": 0.2} and strat.allocation == Allocation(multiple_of=8)
    grid.write_text('model = "tiny-bert"\n[[row]]\nmethod = "strategy"\nalpha = 0.2\nfloor = 0.1\n')
    with pytest.raises(UserError, match="row 1: unknown key 'floor'"):   # strategy's allocation is its own
        SweepConfig.from_toml(grid)


@pytest.mark.parametrize("key", ["neuron_path", "tune"])
@pytest.mark.parametrize("value,error", [("true", None), ("false", None), ('"yes"', "true or false, got 'yes'"),
                                         ("1", "true or false, got 1")])
def test_a_toml_row_takes_neuron_path_and_tune_as_flags(tmp_path, key, value, error):
    """neuron_path defaults to None (the scorer decides) and tune (the compensation's) to the method's default,
    but both are flags: true / false pass, anything else is refused in one line naming the row."""
    grid = tmp_path / "grid.toml"
    grid.write_text(f'model = "tiny-bert"\n[[row]]\nmethod = "calibrated"\nsparsity = 0.5\n{key} = {value}\n')
    if error is None:
        assert SweepConfig.from_toml(grid).grid["row"][0][key] is (value == "true")
    else:
        with pytest.raises(UserError, match=f"row 1: {key} must be {error}"):
            SweepConfig.from_toml(grid)


def test_standardised_ranking_ignores_each_layers_scale_and_offset():
    """normalize="standard" ranks (s - mean) / std per layer (FLAP): a layer whose scores are those of another,
    scaled and shifted, keeps as many; the raw ranking ("none") gives everything to the shifted layer."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, generator=g, dtype=torch.float64)
    scaled = [a, 50 * a + 1000]
    standard = keep_counts(scaled, 0.5, {"kind": "global", "normalize": "standard"})
    assert standard == [20, 20]
    assert keep_counts(scaled, 0.5, {"kind": "global", "normalize": "none"}) == [0, 40]
    steps = [100 + torch.arange(10.0), 100 + 10 * torch.arange(10.0)]   # same order, ten times the spread
    assert keep_counts(steps, 0.5, {"kind": "global", "normalize": "none"}) == [1, 9]
    assert keep_counts(steps, 0.5, {"kind": "global", "normalize": "standard"}) == [5, 5]
    plan = plan_from_scores(Scores(scaled), 0.5, allocation={"kind": "global", "normalize": "standard", "floor": 0.1})
    assert plan.kept_widths == [20, 20] and plan.keep[0] == plan.keep[1] and plan.params["normalize"] == "standard"


def test_a_scorer_of_heads_returns_scores_only_and_the_request_removes_heads():
    loaded = make_classifier("tiny-bert")
    cal = calib(loaded, n=16)
    s = score("calibrated", cal, 0.5, heads=True)
    assert s.head_values is not None and not hasattr(s, "head_sparsity") and not hasattr(s, "allocation")
    res = prune_step(cal, PruneRequest(method="calibrated", sparsity=0.5, allocation=Allocation(head_sparsity=0.5),
                                       mode="mask"))
    assert res.plan.heads is not None and res.plan.params["head_sparsity"] == 0.5
    assert res.plan.heads_removed == round(0.5 * sum(res.plan.head_widths))


def test_a_refit_the_request_asks_for_removes_reconstruction_error():
    """Compensation(kind="refit") on a method without a recipe of its own: the kept neurons' refit leaves
    less of the removed neurons' output missing than plain removal, and the plan does not record it."""
    loaded = make_classifier("tiny-gpt2")
    cal = calib(loaded, n=32)
    res = prune_step(cal, PruneRequest(method="magnitude", sparsity=0.5, compensation=Compensation(kind="refit"),
                                       mode="mask"))
    report = res.compensation
    assert report["ridge"] == DEFAULT_RIDGE and report["readout_mix"] == 0.0
    assert 0 <= report["mean_rel_err_compensated"] < 0.9 * report["mean_rel_err_removed"]
    assert "compensate" not in res.plan.params
    heavy = prune_step(cal, PruneRequest(method="magnitude", sparsity=0.5, params={"ridge": 1e3}, mode="mask"))
    assert heavy.compensation["ridge"] == 1e3       # an old-style ridge parameter is the request's recipe
    assert heavy.compensation["mean_rel_err_compensated"] > report["mean_rel_err_compensated"]


def test_the_cli_options_reach_the_request(monkeypatch, capsys):
    """--normalize, --head-sparsity and --compensation are the request's; a bad combination is one line, exit 2."""
    import anatomy_prune.pipeline.prune as prune_job
    from anatomy_prune.cli import main

    seen = {}

    def fake_prune(req, out, **kw):
        seen["req"] = req
        return {"method": req.method, "mode": req.mode}

    monkeypatch.setattr(prune_job, "prune", fake_prune)
    argv = ["prune", "--model", "tiny-bert", "--out", "unused", "--method", "calibrated", "--sparsity", "0.5"]
    assert main([*argv, "--normalize", "standard", "--head-sparsity", "0.25", "--floor", "0.1",
                 "--multiple-of", "8", "--compensation", "bias"]) == 0
    req = seen["req"]
    assert req.allocation == Allocation(floor=0.1, normalize="standard", multiple_of=8, head_sparsity=0.25)
    assert req.compensation == Compensation(kind="bias") and req.params == {}
    assert main([*argv, "--compensate", "--compensation", "bias"]) == 2
    assert main(["prune", "--model", "tiny-bert", "--out", "unused", "--method", "activation", "--sparsity", "0.5",
                 "--head-sparsity", "0.2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("anatomy-prune")]
    assert len(err) == 2 and "--compensation" in err[0] and "takes no --head-sparsity" in err[1]
