"""The request objects (pipeline.requests): validated once when built, frozen, every fault one line; a
sweep's TOML checked before any model loads; a sweep's rows record the mode that really ran."""
from __future__ import annotations

import dataclasses
import json

import pytest

import anatomy_prune.pipeline.sweep as sweep
from anatomy_prune.cli import main
from anatomy_prune.errors import UserError
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import Allocation, CalibSpec, EvalSpec, PruneRequest, SweepConfig
from anatomy_prune.validate import finite, fraction, known_keys, positive_int, seed32

from conftest import make_classifier


@pytest.mark.parametrize("build,msg", [
    (lambda: EvalSpec(size=0), "--eval-size must be a positive whole number"),
    (lambda: EvalSpec(size="5"), "--eval-size"),
    (lambda: EvalSpec(size=True), "--eval-size"),
    (lambda: EvalSpec(batch_size=2.0), "--batch-size"),
    (lambda: EvalSpec(max_length=1 << 30), "at most"),
    (lambda: EvalSpec(split="train"), "--split"),
    (lambda: CalibSpec(size=-1), "--calib-size"),
    (lambda: CalibSpec(seed=2 ** 32), r"\[0, 4294967295\]"),
    (lambda: CalibSpec(seed=-1), "--seed"),
    (lambda: Allocation(scope="everywhere"), "--allocation"),
    (lambda: Allocation(floor=float("nan")), "--floor"),
    (lambda: Allocation(multiple_of=0), "--multiple-of"),
    (lambda: PruneRequest(method="magnitude", sparsity=float("nan")), "--sparsity"),
    (lambda: PruneRequest(method="magnitude", sparsity="0.5"), "--sparsity"),
    (lambda: PruneRequest(method="magnitude", sparsity=1.0), r"\[0, 1\)"),
    (lambda: PruneRequest(method="magnitude"), "needs --sparsity"),
    (lambda: PruneRequest(method="psychic", sparsity=0.5), "psychic"),
    (lambda: PruneRequest(method="magnitude", sparsity=0.5, mode="banana"), "banana"),
    (lambda: PruneRequest(method="magnitude", sparsity=0.5, params={"alpha": 1.0}), "no parameter"),
    (lambda: PruneRequest(method="calibrated", target={"flops": float("inf")}), "--target-flops"),
    (lambda: PruneRequest(method="calibrated", target={"flops": 1.5}), r"\(0, 1\)"),
    (lambda: PruneRequest(method="calibrated", target={"speedup": 2, "batch": 8}), "did you mean 'batch_size'"),
    (lambda: PruneRequest(method="calibrated", sparsity=0.5, target={"speedup": 2}), "decides the sparsity"),
    (lambda: PruneRequest(method="activation", target={"speedup": 2}), "scores neurons and heads"),
    (lambda: PruneRequest(method="calibrated", sparsity=0.5, layerwise="sequential", mode="mask"), "physically"),
    (lambda: PruneRequest(method="magnitude", sparsity=0.5, layerwise="sequential"), "calibrated recipe"),
    (lambda: PruneRequest(method="strategy", sparsity=0.5, allocation=Allocation(floor=0.1)), "takes no --floor"),
    (lambda: PruneRequest(method="magnitude", sparsity=0.5, params={"floor": 0.1}, allocation=Allocation(floor=0.2)),
     "once"),
    (lambda: PruneRequest(sparsity=0.5), "either a method"),
    (lambda: SweepConfig(model="tiny-bert", seeds=0), "--seeds"),
    (lambda: SweepConfig(model="tiny-bert", sparsities="0.5"), "--sparsities must be a list"),
    (lambda: SweepConfig(model="tiny-bert", sparsities=[0.5, "lots"]), "--sparsities"),
    (lambda: SweepConfig(model="tiny-bert", methods=[], sparsities=[0.5]), "nothing to sweep"),
    (lambda: SweepConfig(model="tiny-bert", num_cpus_per_task=2), "only for --executor ray"),
    (lambda: SweepConfig(model="tiny-bert", executor="ray", num_cpus_per_task=float("nan")), "--num-cpus-per-task"),
    (lambda: SweepConfig(model="tiny-bert", eval={"sise": 10}), "did you mean 'size'"),
])
def test_every_fault_is_one_line_when_the_request_is_built(build, msg):
    with pytest.raises(UserError, match=msg) as exc:
        build()
    assert len(str(exc.value).splitlines()) == 1


def test_requests_are_frozen_clean_and_equal_by_value():
    req = PruneRequest(model="tiny-bert", method="magnitude", sparsity=0.5, params={"floor": 0.2},
                       eval={"size": 8, "data": "imdb"})
    assert req.params == {} and req.allocation == Allocation(floor=0.2) and req.eval == EvalSpec(size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.sparsity = 0.9  # type: ignore[misc]
    cfg = SweepConfig(model="tiny-bert", methods=["magnitude"], sparsities=[0.5], targets=[{"flops": 0.5}])
    assert cfg.methods == ("magnitude",) and cfg.sparsities == (0.5,)
    assert cfg.targets == ({"flops": 0.5, "batch_size": 32, "seq_len": 128, "floor": 0.0},)
    # a target point of a mask sweep is a physical request; the other points keep the sweep's mode
    mask = dataclasses.replace(cfg, mode="mask")
    assert mask.point_request({"method": "calibrated", "sparsity": None, "target": cfg.targets[0]}).mode == "physical"
    assert mask.point_request({"method": "magnitude", "sparsity": 0.5}).mode == "mask"


def test_a_plan_records_the_sparsity_it_reached_and_old_plans_still_read(tmp_path):
    import torch

    from anatomy_prune.plan.allocate import plan_from_scores
    from anatomy_prune.plan.plan import PruningPlan

    plan = plan_from_scores([torch.arange(10.0), torch.arange(7.0)], 0.3)
    assert "sparsity" not in plan.params and "target_sparsity" not in plan.params
    assert plan.sparsity == pytest.approx(5 / 17) and plan.to_dict()["summary"]["sparsity"] == round(5 / 17, 6)
    old = {**plan.to_dict(), "params": {**plan.params, "sparsity": 0.3, "target_sparsity": 0.3}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    again = PruningPlan.load(tmp_path / "old.json")
    assert again.keep == plan.keep and again.sparsity == plan.sparsity


def test_validate_helpers_refuse_what_is_not_in_range():
    assert positive_int(3, "n") == 3 and fraction(0, "s") == 0.0 and seed32(2 ** 32 - 1) == 2 ** 32 - 1
    assert finite(2, "x", 1, strict_lo=True) == 2.0
    for call in (lambda: positive_int(3.0, "n"), lambda: finite(float("-inf"), "x"), lambda: finite("1", "x"),
                 lambda: finite(1, "x", 1, strict_lo=True), lambda: fraction(True, "s"), lambda: seed32(1.5)):
        with pytest.raises(UserError):
            call()
    with pytest.raises(UserError, match="did you mean 'sparsities'"):
        known_keys(["sparsites"], ["model", "sparsities"], "config")


def _write(path, text: str):
    path.write_text(text)
    return path


def test_sweep_toml_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    ok = _write(tmp_path / "ok.toml", 'model = "tiny-bert"\nmethods = ["magnitude"]\nsparsities = [0.3]\nseeds = 2\n'
                '[eval]\nsize = 8\n[calib]\nsize = 4\nseed = 7\n')
    cfg = SweepConfig.from_toml(ok, mode="mask")
    assert (cfg.methods, cfg.sparsities, cfg.seeds, cfg.mode) == (("magnitude",), (0.3,), 2, "mask")
    assert cfg.eval.size == 8 and cfg.calib == CalibSpec(size=4, seed=7)
    for text, msg in [('model = "tiny-bert"\nmethds = ["magnitude"]\n', "unknown key 'methds' .*'methods'"),
                      ('model = "tiny-bert"\nseeds = "five"\n', "--seeds must be a whole number"),
                      ('model = "tiny-bert"\nsparsities = [0.1, "0.3"]\n', "--sparsities"),
                      ('model = "tiny-bert"\n[eval]\nbatch_size = "32"\n', "--batch-size"),
                      ('model = "tiny-bert"\n[[row]]\nmethod = "strategy"\nalpah = 0.1\n', "alpah.*'alpha'"),
                      ('model = "tiny-bert"\n[[row]]\nmethod = "strategy"\nalpha = "high"\n', "alpha must be a number"),
                      ('methods = ["magnitude"]\n', "names no model")]:
        with pytest.raises(UserError, match=msg):
            SweepConfig.from_toml(_write(tmp_path / "bad.toml", text))
    grid = _write(tmp_path / "grid.toml", 'model = "tiny-bert"\nmethods = []\nfocus_depth = 4\n'
                  '[[row]]\nmethod = "strategy"\nalpha = 0.05\nlabel = "a"\n')
    cfg = SweepConfig.from_toml(grid)
    assert cfg.grid["focus_depth"] == 4 and cfg.config == str(grid) and len(cfg.grid["row"]) == 1


def test_bad_request_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", "tiny-bert", "--out", str(out)]
    for argv, msg in [(["prune", *base, "--method", "magnitude", "--sparsity", "0.5", "--seed", "-1"], "--seed"),
                      (["prune", *base, "--method", "magnitude", "--sparsity", "0.5", "--floor", "2"], "--floor"),
                      (["prune", *base, "--target-flops", "1.5"], "--target-flops"),
                      (["prune", *base, "--method", "calibrated", "--target-speedup", "nan"], "--target-speedup"),
                      (["prune", *base, "--method", "magnitude", "--sparsity", "0.5", "--eval-size", "0"], "--eval-size"),
                      (["sweep", *base, "--seeds", "101"], "--seeds"),
                      (["sweep", *base, "--calib-max-length", "0"], "--calib-max-length")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
        assert not out.exists()


def test_a_target_point_records_the_mode_it_ran_in(tmp_path, tiny_csv):
    """A mask sweep prunes its target points physically (heads and neurons removed); their rows say so,
    and their parameter counts show it, while the sweep's own points are masked (all parameters kept)."""
    clf = save_model(make_classifier("tiny-gpt2"), tmp_path / "clf", max_length=32)
    cfg = SweepConfig(model=str(clf), methods=["magnitude"], sparsities=[0.5], mode="mask", figures=False,
                      eval=EvalSpec(data=str(tiny_csv), size=24), calib=CalibSpec(size=8), targets=[{"flops": 0.7}])
    rows = sweep.run_sweep(cfg, tmp_path / "sw", progress=False)
    dense, masked, target = rows
    assert (masked["mode"], target["mode"]) == ("mask", "physical") and target["target"]["flops"] == 0.7
    assert masked["params"] == dense["params"] and target["params"] < dense["params"]
    assert target["heads_removed"] > 0
    written = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["mode"] for r in written[1:]] == ["mask", "physical"]
