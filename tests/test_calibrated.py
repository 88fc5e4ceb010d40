"""The `calibrated` method: sensitivity scores, global per-layer budgets with a floor, compensation."""
import copy
import math

import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply import physical
from anatomy_prune.calibrated import (auto_floor, global_keep_counts, plan_from_stats, sensitivity_scores,
                                      unexplained_share)
from anatomy_prune.compensate import compensate, ffn_input_stats
from anatomy_prune.families import base_model, ffn_sites, get_module, weight_out_in
from anatomy_prune.hooks import capture_ffn_activations
from anatomy_prune.methods import METHODS, make_plan
from anatomy_prune.models import load_model

from conftest import make_classifier
from test_compensate import calib, texts


def test_registered_with_its_recipe():
    m = METHODS["calibrated"]
    assert m.needs_data and {"floor", "score", "beta", "ridge", "readout_mix"} <= set(m.params)


@pytest.mark.parametrize("sparsity,floor", [(0.3, 0.1), (0.6, 0.3), (0.75, 0.2)])
def test_plan_respects_floor_and_target_sparsity(sparsity, floor):
    loaded = make_classifier("tiny-bert")
    plan = make_plan("calibrated", calib(loaded), sparsity, floor=floor)
    total = sum(plan.widths)
    assert plan.neurons_removed == int(round(sparsity * total))
    assert all(k >= math.ceil(floor * w) for k, w in zip(plan.kept_widths, plan.widths))
    assert plan.method == "calibrated" and plan.params["compensate"] is True
    assert plan.params["floor"] == floor and plan.params["allocation"] == "global"
    assert plan.params["readout_mix"] == 0.5 and plan.params["ridge"] > 0


def test_automatic_floor_works_up_to_high_sparsity():
    loaded = make_classifier("tiny-bert")
    plan = make_plan("calibrated", calib(loaded), 0.9)
    assert plan.params["floor_auto"] and plan.params["floor"] == auto_floor(0.9) < 0.1
    assert plan.neurons_removed == int(round(0.9 * 111)) and min(plan.kept_widths) >= 3
    assert auto_floor(0.5) == 0.2 and auto_floor(0.0) == 0.2


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


@pytest.mark.parametrize("score,beta", [("fisher", 0.0), ("taylor", 0.0), ("fisher", 1.0)])
def test_scores_for_a_causal_lm(score, beta):
    loaded = load_model("tiny-llama", device="cpu")
    stats = ffn_input_stats(loaded, calib(loaded, labels=False), cache=False, progress=False)
    scores = sensitivity_scores(stats, score, beta=beta, model=loaded.model)
    assert [s.shape for s in scores] == [(37,)] * 3
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0 for s in scores)
    assert stats.loss is not None and stats.loss > 0


def test_removal_error_protects_a_loud_neuron():
    """beta > 0: a neuron whose output column is huge is kept even when its Fisher score is the lowest."""
    loaded = make_classifier("tiny-bert")
    stats = ffn_input_stats(loaded, calib(loaded), cache=False, progress=False)
    loud = int(torch.argmin(stats.fisher[1]))
    down = get_module(base_model(loaded.model), ffn_sites(loaded.model)[1].down)
    with torch.no_grad():
        weight_out_in(down)[:, loud] *= 100.0
    plain = plan_from_stats(stats, 0.5, beta=0.0)
    aware = plan_from_stats(stats, 0.5, beta=1.0, model=loaded.model)
    assert loud not in plain.keep[1] and loud in aware.keep[1]
    with pytest.raises(ValueError, match="model"):
        sensitivity_scores(stats, "fisher", beta=1.0)


def test_readout_mix_fits_the_last_layer_on_the_readout_token():
    """In a classifier's last layer only the readout token reaches the head: readout_mix=1 rebuilds the last
    FFN's output there better than a fit over all tokens."""
    errs = {}
    for mix in (0.0, 1.0):
        loaded = make_classifier("tiny-bert")
        cal = calib(loaded, n=96, max_length=32)
        stats = ffn_input_stats(loaded, cal, cache=False, progress=False)
        site = ffn_sites(loaded.model)[-1]
        down = get_module(base_model(loaded.model), site.down)
        with torch.no_grad(), capture_ffn_activations(loaded.model) as acts:
            for b in cal.batches():
                loaded.model(**b)
        h = torch.cat([a[:, 0] for a in acts[-1]])                            # CLS tokens: [n, d_ff]
        with torch.no_grad():
            dense = down(h)
        plan = plan_from_stats(stats, 0.6, beta=0.0, readout_mix=mix)
        compensate(loaded.model, plan, stats)
        keep = torch.zeros(h.shape[1])
        keep[plan.keep[site.layer]] = 1.0
        with torch.no_grad():
            errs[mix] = (down(h * keep) - dense).pow(2).sum().item()
    assert errs[1.0] < errs[0.0]


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


@pytest.mark.slow
def test_fine_tuned_minilm_keeps_its_accuracy_at_half_the_neurons():
    """The real thing, small: runs/demo/model, 64 calibration reviews, 200 test reviews, 50% removed."""
    from pathlib import Path

    from anatomy_prune.data import eval_set
    from anatomy_prune.evaluate import evaluate_classifier
    from anatomy_prune.prune import make_calibration

    if not (Path("runs/demo/model") / "anatomy_prune.json").is_file():
        pytest.skip("runs/demo/model is not there (make demo)")
    loaded = load_model("runs/demo/model", device="cpu")
    test = eval_set("imdb", 200)
    dense = evaluate_classifier(loaded, test, 64, 128, progress=False)["accuracy"]
    cal = make_calibration(loaded, 64, 128, exclude=test.texts, batch_size=16)
    plan = make_plan("calibrated", cal, 0.5)
    report = compensate(loaded.model, plan, ffn_input_stats(loaded, cal, progress=False))
    physical(loaded.model, plan)
    pruned = evaluate_classifier(loaded, test, 64, 128, progress=False)["accuracy"]
    assert report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]
    assert pruned >= dense - 0.02
