"""Sequential output tuning (apply.tune, `prune --tune`): each sublayer's output projection refitted toward the
dense model's residual stream on the pruned model's inputs; the recipe that asks for it, its defaults, its
record in the plan and what it refuses."""
import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply.tune import tune_outputs
from anatomy_prune.cli import main
from anatomy_prune.models.families import base_model, ffn_sites
from anatomy_prune.models.loading import load_model
from anatomy_prune.pipeline.compensation import Compensation, compensation_recipe
from anatomy_prune.pipeline.iterative import prune_iterative
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import copy_loaded, prune_step
from anatomy_prune.scores.calibration import Calibration

from conftest import make_classifier
from test_compensate import calib


def _calib(loaded) -> Calibration:    # batches of 7 with padding: the mask and several batches matter
    return calib(loaded, n=28, seed=3, max_length=20, batch_size=7, labels=loaded.kind == "classifier")


@torch.no_grad()
def _last_hidden(loaded, cal: Calibration) -> torch.Tensor:
    """The base model's last hidden states on the calibration texts, real tokens only [n, d]."""
    rows = []
    for b in cal.for_model(loaded).batches():
        out = base_model(loaded.model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        rows.append(out.last_hidden_state[b["attention_mask"].bool()])
    return torch.cat(rows)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_an_unpruned_copy_is_left_as_it_is(alias):
    """Nothing removed: every sublayer already matches the dense stream, so the fit returns today's weights."""
    dense = make_classifier(alias) if alias == "tiny-bert" else load_model(alias, device="cpu")
    work = copy_loaded(dense)
    report = tune_outputs(work, dense, _calib(dense), ridge=1e-2)
    assert len(report["sublayers"]) == 2 * len(ffn_sites(dense.model))     # attention, then FFN, per block
    assert all(e["rel_err_before"] < 1e-10 and e["rel_err_after"] < 1e-8 for e in report["sublayers"])
    for p, q in zip(work.model.parameters(), dense.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_tuning_brings_the_pruned_stream_toward_the_dense_one(alias):
    """After an FFN cut and the within-layer refit, tuning lowers each sublayer's fitted error and the last
    hidden states' distance to the dense model's on the calibration texts (what it fits)."""
    dense = make_classifier(alias) if alias == "tiny-bert" else load_model(alias, device="cpu")
    cal = _calib(dense)
    res = prune_step(cal, PruneRequest(method="calibrated", sparsity=0.6, params={"tune": False}))
    assert "tune" not in (res.compensation or {})
    before = (_last_hidden(res.loaded, cal) - _last_hidden(dense, cal)).pow(2).sum()
    report = tune_outputs(res.loaded, dense, cal, ridge=1e-3)
    after = (_last_hidden(res.loaded, cal) - _last_hidden(dense, cal)).pow(2).sum()
    subs = [e for e in report["sublayers"] if "rel_err_after" in e]
    assert all(e["rel_err_after"] <= e["rel_err_before"] * (1 + 1e-6) + 1e-12 for e in subs)
    assert any(e["rel_err_after"] < 0.95 * e["rel_err_before"] for e in subs)   # something was fixed
    assert after < 0.9 * before


def test_the_recipe_tunes_a_causal_lm_by_default_and_records_it():
    llama, bert = load_model("tiny-llama", device="cpu"), make_classifier("tiny-bert")
    res = prune_step(_calib(llama), PruneRequest(method="calibrated", sparsity=0.5))
    assert res.plan.params["tune"] is True and res.recipe["tune"] is True
    assert res.compensation["tune"]["mean_rel_err_after"] <= res.compensation["tune"]["mean_rel_err_before"]
    # a plan that records it replays it; --no-tune overrides
    assert compensation_recipe(res.plan, None)["tune"] is True
    assert compensation_recipe(res.plan, Compensation(tune=False))["tune"] is False
    res = prune_step(_calib(bert), PruneRequest(method="calibrated", sparsity=0.5))
    assert "tune" not in res.plan.params and "tune" not in res.compensation    # an encoder: off unless asked
    res = prune_step(_calib(bert), PruneRequest(method="calibrated", sparsity=0.5, compensation=Compensation(tune=True)))
    assert res.plan.params["tune"] is True and res.compensation["tune"]["sublayers"] == 2 * len(ffn_sites(bert.model))


def test_no_tune_alone_does_not_turn_compensation_on():
    llama = load_model("tiny-llama", device="cpu")
    res = prune_step(_calib(llama), PruneRequest(method="magnitude", sparsity=0.5, compensation=Compensation(tune=False)))
    assert res.compensation is None and res.recipe is None
    res = prune_step(_calib(llama), PruneRequest(method="magnitude", sparsity=0.5, params={"tune": True}))
    assert res.recipe["kind"] == "refit" and res.recipe["tune"] is True     # asking for it compensates too


def test_iterative_tunes_once_at_the_end_toward_the_dense_model():
    llama = load_model("tiny-llama", device="cpu")
    dense = copy_loaded(llama)
    cal = _calib(llama)
    res = prune_iterative(cal, PruneRequest(method="calibrated", sparsity=0.5, iterations=2), inplace=True)
    assert set(res.compensation) == {"iterations", "tune"}
    assert all("tune" not in r for r in res.compensation["iterations"])
    for p, q in zip(llama.model.parameters(), dense.model.parameters()):   # the dense model stayed the reference
        assert torch.equal(p, q)


@pytest.mark.parametrize("value", ["yes", 1, 0.5])
def test_tune_must_be_a_bool(value):
    with pytest.raises(UserError, match=f"tune must be true or false, got {value!r}"):
        PruneRequest(method="calibrated", sparsity=0.5, params={"tune": value})


def test_layerwise_refuses_tune():
    """The layer-wise path holds one block at a time, not the dense model beside the pruned one."""
    with pytest.raises(UserError, match="--layerwise takes the parameters .*; not tune"):
        PruneRequest(method="calibrated", sparsity=0.5, layerwise="sequential", compensation=Compensation(tune=True))


def test_cli_tune_flag(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--model", "tiny-llama", "--method", "calibrated", "--sparsity", "0.5", "--no-tune",
                 "--calib-size", "8", "--eval-size", "4", "--out", str(out)]) == 0
    plan = (out / "plan.json").read_text()
    assert '"tune"' not in plan
    capsys.readouterr()
    bad = tmp_path / "q"
    assert main(["prune", "--model", "tiny-llama", "--method", "calibrated", "--sparsity", "0.5", "--tune",
                 "--layerwise", "sequential", "--mode", "physical", "--calib-size", "8", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not tune" in err[0]
    assert not bad.exists()


def test_a_placed_model_is_not_tuned_by_default_and_refuses_tune(monkeypatch):
    """A model placed by --device-map is pruned in place with no room for the dense copy the tuning refits toward:
    the causal LM's default leaves tuning off, and asking for it is one line that says what to do."""
    import anatomy_prune.pipeline.step as step
    monkeypatch.setattr(step, "is_dispatched", lambda model: True)
    llama = load_model("tiny-llama", device="cpu")
    res = prune_step(_calib(llama), PruneRequest(method="calibrated", sparsity=0.5), inplace=True)
    assert "tune" not in res.plan.params and "tune" not in res.compensation
    with pytest.raises(UserError, match="--device-map has no room for one: leave --tune out"):
        prune_step(_calib(load_model("tiny-llama", device="cpu")),
                   PruneRequest(method="calibrated", sparsity=0.5, compensation=Compensation(tune=True)), inplace=True)


def test_bias_compensation_can_be_tuned_too():
    """A bias recipe has no ridge of its own; the tuning then takes the default (it crashed on the missing key)."""
    llama = load_model("tiny-llama", device="cpu")
    res = prune_step(_calib(llama), PruneRequest(method="fluctuation", sparsity=0.5,
                                                 compensation=Compensation(kind="bias", tune=True)))
    assert res.recipe["kind"] == "bias" and res.compensation["tune"]["sublayers"] == 2 * len(ffn_sites(llama.model))


def test_the_tuning_takes_its_own_ridge_not_the_refits():
    """`ridge` is the within-layer refit's; the tuning solves with apply.tune.TUNE_RIDGE whatever it says, and
    reports it."""
    from anatomy_prune.apply.tune import TUNE_RIDGE

    llama = load_model("tiny-llama", device="cpu")
    res = prune_step(_calib(llama), PruneRequest(method="calibrated", sparsity=0.5, params={"ridge": 5.0}))
    assert res.recipe["ridge"] == 5.0 and res.compensation["tune"]["ridge"] == TUNE_RIDGE != 5.0
