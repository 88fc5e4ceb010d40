"""The `calibrated` method: sensitivity scores, global per-layer budgets with a floor, compensation."""
import copy
import math

import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply import physical
from anatomy_prune.apply.compensate import compensate
from anatomy_prune.models.families import base_model, ffn_sites, get_module, weight_out_in
from anatomy_prune.models.loading import load_model
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import plan_step, prune_step
from anatomy_prune.plan import keep_counts, plan_from_scores
from anatomy_prune.scores import Scores, get_scorer
from anatomy_prune.linalg import unexplained_share
from anatomy_prune.scores.calibrated import auto_floor, sensitivity_scores
from anatomy_prune.scores.calibration import calibration_pass, ffn_input_stats

from conftest import capture_ffn_hidden, make_classifier
from test_compensate import calib, texts


def make_plan(name, cal, sparsity, **params):
    """Score, then the one allocator with the request's options over the method's defaults (no compensation
    applied: the plan records the recipe)."""
    return plan_step(cal, PruneRequest(method=name, sparsity=sparsity, params=params))[0]


def plan_from_stats(stats, sparsity, beta=0.0, model=None, floor=None):
    """The calibrated allocation (global, raw scores, floor) of sensitivity scores from given statistics."""
    values = sensitivity_scores(stats, "fisher", beta=beta, model=model)
    allocation = {"kind": "global", "floor": auto_floor(sparsity) if floor is None else floor, "normalize": "none"}
    return plan_from_scores(Scores(values), sparsity, allocation=allocation)


def test_registered_with_its_options_only():
    """The scorer's options are what it measures with; floor, normalize, readout_mix, head_sparsity are the
    request's (ridge stays: its error term's fit)."""
    m = get_scorer("calibrated")
    assert m.needs_data and set(m.params) == {"score", "beta", "rebuilt", "ridge", "heads", "head_rebuilt",
                                              "neuron_path"}
    assert m.params["head_rebuilt"] is True                          # the head error after a refit (issue 25)
    assert m.params["neuron_path"] is None                           # the elimination path with the heads only
    with pytest.raises(UserError, match="head_rebuilt must be true or false, got 'false'"):
        m.options(**{**m.params, "head_rebuilt": "false"})          # a string from a file is not a bool
    with pytest.raises(UserError, match="neuron_path must be true or false, got 1"):
        m.options(**{**m.params, "neuron_path": 1})


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
    counts = keep_counts(scores, 0.5, {"kind": "global", "floor": 0.1, "normalize": "none"})
    assert sum(counts) == 60 and counts[0] > counts[1] > counts[2] == 4
    even = keep_counts(scores, 0.5, {"kind": "global", "floor": 0.1, "normalize": "mean"})
    assert sum(even) == 60 and max(even) - min(even) < counts[0] - counts[2]
    with pytest.raises(UserError, match="normalize"):
        keep_counts(scores, 0.5, {"kind": "global", "normalize": "max"})


def test_the_one_allocator_kinds_and_rounding():
    scores = [torch.arange(37.0) - 18.5, torch.arange(37.0) - 32.5, torch.full((20,), -0.5)]
    assert keep_counts(scores, 0.5, {"kind": "local"}) == [19, 19, 10]            # 37 - round(18.5), 20 - 10
    assert keep_counts(scores, None, {"kind": "threshold"}) == [18, 4, 0]           # score >= 0 kept
    assert keep_counts(scores, 0.5, {"kind": "local", "multiple_of": 8}) == [24, 24, 16]
    assert keep_counts(scores, 0.1, {"kind": "local", "multiple_of": 16}) == [37, 37, 20]  # capped at the width
    with pytest.raises(UserError, match="sparsity"):
        keep_counts(scores, None, {"kind": "local"})
    for bad in ({"floor": 1.5}, {"floor": "x"}, {"multiple_of": 0}, {"multiple_of": 2.0}):
        with pytest.raises(UserError):
            keep_counts(scores, 0.5, {"kind": "global", **bad})


def test_same_data_same_plan():
    loaded = make_classifier("tiny-gpt2")
    a = make_plan("calibrated", calib(loaded), 0.5)
    b = make_plan("calibrated", calib(loaded), 0.5)
    assert a.keep == b.keep and a.seed == b.seed == 0


@pytest.mark.parametrize("score,beta", [("fisher", 0.0), ("taylor", 0.0), ("fisher", 1.0)])
def test_scores_for_a_causal_lm(score, beta):
    loaded = load_model("tiny-llama", device="cpu")
    collected = calibration_pass(calib(loaded, labels=False), cache=False, progress=False)
    stats = collected.ffn
    scores = sensitivity_scores(stats, score, beta=beta, model=loaded.model)
    assert [s.shape for s in scores] == [(37,)] * 3
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0 for s in scores)
    assert collected.loss is not None and collected.loss > 0 and collected.heads is None


def test_removal_error_protects_a_loud_neuron():
    """beta > 0: a neuron whose output column is huge is kept even when its Fisher score is the lowest."""
    loaded = make_classifier("tiny-bert")
    stats = ffn_input_stats(calib(loaded), cache=False, progress=False)
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
        stats = ffn_input_stats(cal, cache=False, progress=False)
        site = ffn_sites(loaded.model)[-1]
        down = get_module(base_model(loaded.model), site.down)
        with torch.no_grad(), capture_ffn_hidden(loaded.model) as acts:
            for b in cal.batches():
                loaded.model(**b)
        h = torch.cat([a[:, 0] for a in acts[-1]])                            # CLS tokens: [n, d_ff]
        with torch.no_grad():
            dense = down(h)
        plan = plan_from_stats(stats, 0.6, beta=0.0)
        compensate(loaded.model, plan, stats, readout_mix=mix)
        keep = torch.zeros(h.shape[1])
        keep[list(plan.keep[site.layer])] = 1.0
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
    """End to end on a tiny classifier: the same calibrated plan with compensation (the pruning step applies
    the scorer's recipe) changes the logits of reviews it never saw less than without."""
    loaded = make_classifier(alias)
    cal = calib(loaded, n=96, max_length=32)
    res = prune_step(cal, PruneRequest(method="calibrated", sparsity=0.5, params={"floor": 0.2}, mode="physical"))
    plan, report = res.plan, res.compensation
    assert plan.params["compensate"] is True and report["readout_mix"] == 0.5 and report["ridge"] > 0
    assert plan.keep == make_plan("calibrated", cal, 0.5, floor=0.2).keep
    held = loaded.tokenizer(texts(32, seed=123), padding=True, truncation=True, max_length=32,
                            return_tensors="pt")
    held = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    with torch.no_grad():
        dense = loaded.model(**held)
    plain = copy.deepcopy(loaded.model)
    physical(plain, plan)
    with torch.no_grad():
        err_plain = (plain(**held) - dense).abs().mean()
        err_comp = (res.loaded.model(**held) - dense).abs().mean()
    assert err_comp < err_plain
    assert report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]


def test_scores_without_gradients_are_refused():
    loaded = load_model("tiny-bert", device="cpu")
    stats = ffn_input_stats(calib(loaded, labels=False), cache=False, progress=False)
    with pytest.raises(UserError, match="gradients"):
        sensitivity_scores(stats, "fisher")
    with pytest.raises(UserError, match="score"):
        sensitivity_scores(stats, "hessian")


@pytest.mark.slow
def test_fine_tuned_minilm_keeps_its_accuracy_at_half_the_neurons():
    """The real thing, small: runs/demo/finetune/model, 64 calibration reviews, 200 test reviews, 50% removed."""
    from pathlib import Path

    from anatomy_prune.data import eval_set
    from anatomy_prune.evaluate import evaluate_classifier
    from anatomy_prune.scores.calibration import make_calibration

    model_dir = Path("runs/demo/finetune/model")
    if not (model_dir / "anatomy_prune.json").is_file():
        pytest.skip(f"{model_dir} is not there (make demo)")
    loaded = load_model(str(model_dir), device="cpu")
    test = eval_set("imdb", 200)
    dense = evaluate_classifier(loaded, test, 64, 128, progress=False)["accuracy"]
    cal = make_calibration(loaded, 64, 128, exclude=test.texts, batch_size=16)
    res = prune_step(cal, PruneRequest(method="calibrated", sparsity=0.5, mode="physical"))
    report = res.compensation
    pruned = evaluate_classifier(res.loaded, test, 64, 128, progress=False)["accuracy"]
    assert report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]
    assert pruned >= dense - 0.02


# --- the calibration pass's gradient statistics against a per-example autograd reference ----------------

def per_example_unit_grads(loaded, cal, point, units_of):
    """Reference: each example run alone (no padding), its loss backpropagated to what `point` of every layer
    receives (x, kept with retain_grad); dL_i/dm_u = sum over its tokens and unit u's features of x * dL/dx.
    Returns per layer [n_examples, units]."""
    from anatomy_prune.hooks import layer_of, run_with_hooks

    rows = []
    for i, text in enumerate(cal.texts):
        enc = loaded.tokenizer([text], truncation=True, max_length=cal.max_length, return_tensors="pt")
        seen = {}

        def keep(x, p):
            x.retain_grad()
            seen[layer_of(p)] = x

        with run_with_hooks(loaded.model, {point: keep}):
            out = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        if loaded.kind == "classifier":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), torch.tensor([float(cal.labels[i])]))
        else:
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), enc["input_ids"][0, 1:])
        loss.backward()
        rows.append([torch.stack([(seen[l] * seen[l].grad)[0][:, f].sum().double() for f in units_of(l)])
                     for l in sorted(seen)])
    return [torch.stack([r[l] for r in rows]) for l in range(len(rows[0]))]


@pytest.mark.parametrize("alias,kind", [("tiny-llama", "causal-lm"), ("tiny-bert", "classifier")])
def test_fisher_and_taylor_equal_per_example_autograd(alias, kind):
    """Neurons and head units: the pass (batches of 3 with padding, masks on the hook points) gives the sums
    over examples of the per-example gradients, squared (Fisher) and signed (Taylor), of the reference."""
    from anatomy_prune.models.families import attention_sites

    loaded = make_classifier(alias) if kind == "classifier" else load_model(alias, device="cpu")
    cal = calib(loaded, n=5, batch_size=3, labels=kind == "classifier")
    got = calibration_pass(cal, grads=True, heads=True, cache=False, progress=False)
    neurons = per_example_unit_grads(loaded, cal, "ffn.*.hidden", lambda l: [[j] for j in range(37)])
    sites = attention_sites(loaded.model)
    heads = per_example_unit_grads(loaded, cal, "attn.*.heads",
                                   lambda l: [sites[l].q_features([u]) for u in range(sites[l].n_units)])
    for stats, ref in ((got.ffn, neurons), (got.heads, heads)):
        for layer, g in enumerate(ref):                                           # g: [examples, units]
            assert g.abs().sum() > 0
            torch.testing.assert_close(stats.fisher[layer], (g * g).sum(0), rtol=2e-3, atol=1e-9)
            torch.testing.assert_close(stats.taylor[layer], g.sum(0), rtol=2e-3, atol=1e-7)
    assert [len(f) for f in got.heads.fisher] == [s.n_units for s in sites]


@pytest.mark.parametrize("alias,heads,expect", [("tiny-bert", False, False), ("tiny-llama", False, True)])
def test_neurons_go_along_their_path_for_a_causal_lm_and_with_heads(alias, heads, expect):
    """neuron_path unset: a causal LM's neurons (or any model's, with heads) are scored along the elimination path,
    an encoder classifier's FFN alone leave-one-out; the plan records which; an explicit value wins."""
    loaded = make_classifier(alias) if alias == "tiny-bert" else load_model(alias, device="cpu")
    cal = calib(loaded)
    plan, *_ = plan_step(cal, PruneRequest(method="calibrated", sparsity=0.5))
    assert bool(plan.params.get("neuron_path")) is expect
    forced, *_ = plan_step(cal, PruneRequest(method="calibrated", sparsity=0.5, params={"neuron_path": not expect}))
    assert bool(forced.params.get("neuron_path")) is (not expect)
    assert forced.keep != plan.keep


def test_a_second_target_on_one_sample_reuses_the_scores(monkeypatch):
    """The removal paths are computed once per calibration sample and settings, like the statistics: a second
    target reuses them (no path is run again) and plans as a fresh sample would."""
    import anatomy_prune.scores.calibrated as calibrated

    loaded = make_classifier("tiny-bert")
    runs = []
    real = calibrated.elimination_path
    monkeypatch.setattr(calibrated, "elimination_path", lambda *a, **k: runs.append(1) or real(*a, **k))
    cal = calib(loaded)
    first, *_ = plan_step(cal, PruneRequest(method="calibrated", target={"flops": 0.6}))
    n = len(runs)
    second, *_ = plan_step(cal, PruneRequest(method="calibrated", target={"flops": 0.4}))
    assert n == 3 and len(runs) == n                       # one path per layer, once
    fresh, *_ = plan_step(calib(loaded), PruneRequest(method="calibrated", target={"flops": 0.4}))
    assert second.keep == fresh.keep and second.heads == fresh.heads != first.heads
