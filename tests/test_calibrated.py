"""The `calibrated` method: sensitivity scores, global per-layer budgets with a floor, compensation."""
import copy
import math

import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply import physical
from anatomy_prune.calibrated import global_keep_counts, plan_from_stats, sensitivity_scores, unexplained_share
from anatomy_prune.compensate import compensate, ffn_input_stats
from anatomy_prune.methods import METHODS, Calibration, make_plan
from anatomy_prune.models import load_model

from conftest import make_classifier
from test_compensate import calib, texts


def test_registered_with_its_recipe():
    m = METHODS["calibrated"]
    assert m.needs_data and {"floor", "score", "ridge"} <= set(m.params)


@pytest.mark.parametrize("sparsity,floor", [(0.3, 0.1), (0.6, 0.3), (0.8, 0.2)])
def test_plan_respects_floor_and_target_sparsity(sparsity, floor):
    loaded = make_classifier("tiny-bert")
    plan = make_plan("calibrated", calib(loaded), sparsity, floor=floor)
    total = sum(plan.widths)
    assert plan.neurons_removed == int(round(sparsity * total))
    assert all(k >= math.ceil(floor * w) for k, w in zip(plan.kept_widths, plan.widths))
    assert plan.method == "calibrated" and plan.params["compensate"] is True
    assert plan.params["floor"] == floor and plan.params["allocation"] == "global"


def test_sparsity_below_the_floor_is_refused():
    loaded = make_classifier("tiny-bert")
    with pytest.raises(UserError, match="floor"):
        make_plan("calibrated", calib(loaded), 0.8, floor=0.5)


def test_global_budgets_follow_the_scores():
    """A layer whose neurons matter less loses more of them; normalize='mean' evens that out."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(40, generator=g) * 10, torch.rand(40, generator=g), torch.rand(40, generator=g) * 0.1]
    counts = global_keep_counts(scores, 0.5, floor=0.1)
    assert sum(counts) == 60 and counts[0] > counts[1] > counts[2] == 4
    even = global_keep_counts(scores, 0.5, floor=0.1, normalize="mean")
    assert max(even) - min(even) < counts[0] - counts[2]
    with pytest.raises(UserError, match="normalize"):
        global_keep_counts(scores, 0.5, normalize="max")


def test_same_data_same_plan():
    loaded = make_classifier("tiny-gpt2")
    a = make_plan("calibrated", calib(loaded), 0.5)
    b = make_plan("calibrated", calib(loaded), 0.5)
    assert a.keep == b.keep and a.seed == b.seed == 0


@pytest.mark.parametrize("score", ["fisher", "taylor", "fisher_resid"])
def test_scores_for_a_causal_lm(score):
    loaded = load_model("tiny-llama", device="cpu")
    stats = ffn_input_stats(loaded, calib(loaded, labels=False), cache=False, progress=False)
    scores = sensitivity_scores(stats, score)
    assert [s.shape for s in scores] == [(37,)] * 3
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0 for s in scores)
    assert stats.loss is not None and stats.loss > 0


def test_unexplained_share_of_a_copied_neuron_is_near_zero():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(500, 5, generator=g, dtype=torch.float64)
    h = torch.cat([h, 3 * h[:, :1] + 1], dim=1)                                # neuron 5 = 3 * neuron 0 + 1
    z = torch.cat([h, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    share = unexplained_share(z.t() @ z, ridge=1e-8)
    assert share[5] < 1e-4 and share[0] < 1e-4 and (share[1:5] > 0.9).all()


def test_bare_backbone_has_no_loss_to_score_with():
    loaded = load_model("tiny-bert", device="cpu")
    with pytest.raises(UserError, match="fine-tune"):
        make_plan("calibrated", calib(loaded), 0.5)


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_compensated_pruning_moves_logits_less_on_held_out_inputs(alias):
    """End to end on a tiny classifier: the same calibrated plan with compensation changes the logits of
    reviews it never saw less than without."""
    loaded = make_classifier(alias)
    cal = calib(loaded, n=96, max_length=32)
    plan = make_plan("calibrated", cal, 0.5, floor=0.2)
    held = loaded.tokenizer(texts(32, seed=123), padding=True, truncation=True, max_length=32,
                            return_tensors="pt")
    held = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    with torch.no_grad():
        dense = loaded.model(**held)
    plain = copy.deepcopy(loaded.model)
    physical(plain, plan)
    stats = ffn_input_stats(loaded, cal, progress=False)   # reused from the plan's pass
    report = compensate(loaded.model, plan, stats)
    physical(loaded.model, plan)
    with torch.no_grad():
        err_plain = (plain(**held) - dense).abs().mean()
        err_comp = (loaded.model(**held) - dense).abs().mean()
    assert err_comp < err_plain
    assert report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]


def test_plan_from_stats_without_gradients_is_refused():
    loaded = load_model("tiny-bert", device="cpu")
    stats = ffn_input_stats(loaded, calib(loaded, labels=False), cache=False, progress=False)
    with pytest.raises(UserError, match="gradients"):
        plan_from_stats(stats, 0.5)
