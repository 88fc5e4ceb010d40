"""Scorers (random, magnitude, activation, the paper's strategy) behind the registry, the calibration
statistics they share, and the plans the one allocator makes from their scores."""
import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.models.families import base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from anatomy_prune.pipeline.allocation import Allocation, resolve
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.plan import plan_from_scores
from anatomy_prune.scores import SCORERS, Scores, check_params, get_scorer, score, scorer_names
from anatomy_prune.scores.basic import magnitude_scores
from anatomy_prune.scores.calibration import Calibration, activation_stats, important_neurons, similarity_stats
from anatomy_prune.scores.strategy import default_focus, map_focus, strategy_thresholds

from conftest import TEXTS, capture_ffn_hidden

CALIB_TEXTS = TEXTS + ["Not bad at all.", "The worst film of the year, by far and away.",
                       "A quiet, tender story; I loved every minute of it.", "Meh."]
PAPER_METHODS = ("random", "magnitude", "strategy", "activation")


def make_plan(name, calib, sparsity, **params):
    """Score (the registry's refusals), then the one allocator with the method's default allocation."""
    scores = score(name, calib, sparsity, **params)
    how = resolve(name, check_params(name, params), sparsity, Allocation(), None)
    return plan_from_scores(scores, sparsity, allocation=how.allocation, base_model=calib.loaded.base_spec,
                            method=name, seed=calib.seed)


@pytest.fixture
def calib(tiny) -> Calibration:
    return Calibration(tiny, CALIB_TEXTS, max_length=32, batch_size=3, seed=0)


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_plan_size_is_exact_at_a_target_sparsity(calib, name):
    plan = make_plan(name, calib, 0.4)
    assert plan.method == name and list(plan.widths) == [37, 37, 37]
    if name == "strategy":  # one global count, from the rule's solved alpha
        assert plan.neurons_removed == round(0.4 * 111)
        assert plan.params["alpha_solved"] and plan.params["alpha"] > 0
    else:  # the same fraction in every layer
        assert plan.removed_per_layer == [round(0.4 * 37)] * 3
    assert "sparsity" not in plan.params and "target_sparsity" not in plan.params  # one sparsity: plan.sparsity
    assert make_plan(name, calib, 0.0).neurons_removed == 0


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_same_seed_same_plan(tiny, name):
    a = make_plan(name, Calibration(tiny, CALIB_TEXTS, max_length=32, seed=3), 0.5)
    b = make_plan(name, Calibration(tiny, CALIB_TEXTS, max_length=32, seed=3), 0.5)
    assert a.keep == b.keep and a.seed == 3


def test_random_depends_on_seed(tiny):
    a = make_plan("random", Calibration(tiny, CALIB_TEXTS, max_length=32, seed=0), 0.5, protect=False)
    b = make_plan("random", Calibration(tiny, CALIB_TEXTS, max_length=32, seed=1), 0.5, protect=False)
    assert a.keep != b.keep


def test_strategy_solved_alpha_hits_the_target(calib):
    for sparsity in (0.2, 0.5, 0.8):
        plan = make_plan("strategy", calib, sparsity)
        target = round(sparsity * 111)
        # the rule itself, run at the solved alpha, lands within one neuron per layer of the target
        again = make_plan("strategy", calib, None, alpha=plan.params["alpha"], focus=plan.params["focus"],
                          **({} if calib.loaded.family.decoder else {"beta": plan.params["beta"]}))
        assert abs(again.neurons_removed - target) <= plan.n_layers
        assert not again.params["alpha_solved"]


def test_strategy_prunes_below_threshold_by_hand(calib):
    """With explicit alpha the plan removes exactly the neurons whose mean |similarity| is below t_i."""
    stats = similarity_stats(calib)
    decoder = calib.loaded.family.decoder
    plan = make_plan("strategy", calib, None, alpha=0.2, focus=[2])
    ls = stats["layer_sim"]
    for i, m in enumerate(stats["neuron_abs"]):
        f = 3.0 if i == 2 else 1.0
        t = abs(ls[i].item() * 0.2 * f + (0 if decoder else i * 0.001))  # block i pairs with layer_sim[i]
        assert set(plan.removed(i)) == set(torch.nonzero(m < t).flatten().tolist())


def test_strategy_thresholds_formula():
    ls = torch.tensor([-0.5, 0.2, 0.4, 1.0])  # L+1 = 4 entries for 3 blocks
    enc = strategy_thresholds(ls, alpha=0.1, beta=0.01, focus=[2], decoder=False)
    torch.testing.assert_close(enc, torch.tensor([0.05, 0.03, 0.14], dtype=torch.float64))
    dec = strategy_thresholds(ls, alpha=0.1, beta=0.01, focus=[2], decoder=True)
    torch.testing.assert_close(dec, torch.tensor([0.05, 0.02, 0.12], dtype=torch.float64))


def test_focus_mapping():
    assert map_focus([4, 6, 8, 10, 11], 12) == [4, 6, 8, 10, 11]
    assert map_focus([4, 6, 8, 10, 11], 6) == [2, 3, 4, 5]   # MiniLM
    assert default_focus(30, decoder=True) == [29]           # SmolLM2: GPT-2's layer 11 = the last
    assert default_focus(3, decoder=False) == [1, 2]


def test_random_keeps_the_protected_neurons(calib):
    important = important_neurons(calib, threshold=0.2)
    assert sum(map(len, important)) > 0  # tiny models: cosines are large, so a low threshold finds some
    plan = make_plan("random", calib, 0.6, threshold=0.2)
    for layer, ids in enumerate(important):
        assert set(ids) <= set(plan.keep[layer])
    assert plan.params["protected_per_layer"] == [len(i) for i in important]
    unprotected = make_plan("random", calib, 0.9, protect=False)
    assert not plan.params.get("protected_per_layer") or any(
        not set(ids) <= set(unprotected.keep[layer]) for layer, ids in enumerate(important))


def test_protected_neurons_beyond_the_budget_are_all_kept():
    values = [torch.arange(10, dtype=torch.float)]  # the protected ones have the lowest scores
    plan = plan_from_scores(Scores(values, must_keep=[[0, 1, 2, 3, 4]]), 0.8, allocation={"kind": "local"})
    assert plan.to_dict()["keep"] == [[0, 1, 2, 3, 4]]
    plan = plan_from_scores(Scores(values, must_keep=[[0]]), 0.8)
    assert plan.to_dict()["keep"] == [[0, 9]]  # the protected one, then the best score


def test_activation_is_the_mean_over_real_tokens(calib):
    model, tok = calib.loaded.model, calib.loaded.tokenizer
    got = activation_stats(calib)
    total, n = None, 0
    for text in CALIB_TEXTS:  # one text per pass: no padding at all
        enc = tok([text], truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad(), capture_ffn_hidden(model) as acts:
            base_model(model)(**enc)
        s = torch.stack([a[0][0].abs().sum(dim=0) for a in acts])  # [layers, d_ff]
        total = s if total is None else total + s
        n += enc["input_ids"].shape[1]
    torch.testing.assert_close(torch.stack(got), total / n, rtol=1e-4, atol=1e-6)


def test_statistics_are_computed_once_and_charged(calib):
    make_plan("strategy", calib, 0.3)
    assert {"forward", "similarity"} <= calib.used  # labels of the cache keys
    first = dict(calib.timings)
    calib.used.clear()
    make_plan("activation", calib, 0.3)  # reuses the same forward pass
    assert calib.timings == first and "forward" in calib.used and "similarity" not in calib.used


def test_multiple_of_rounds_kept_widths(calib):
    from anatomy_prune.pipeline.requests import Allocation
    for name in ("magnitude", "strategy"):  # the request's allocation (magnitude) or the method's own (strategy)
        plan = prune_step(calib, PruneRequest(method=name, sparsity=0.5, allocation=Allocation(multiple_of=8))).plan
        assert all(w % 8 == 0 or w == 37 for w in plan.kept_widths)


def test_bad_input():
    from anatomy_prune import load_model
    calib = Calibration(load_model("tiny-bert", device="cpu"), CALIB_TEXTS, max_length=32)

    def by_step(name, cal, sparsity, **params):  # the pruning step refuses the same requests up front
        return prune_step(cal, PruneRequest(method=name, sparsity=sparsity, params=params))

    for call, msg in [
        (lambda: make_plan("nope", calib, 0.5), "choose one of: activation, .*magnitude, random, strategy"),
        (lambda: make_plan("magnitude", calib, 1.0), r"\[0, 1\)"),
        (lambda: make_plan("magnitude", calib, -0.1), r"\[0, 1\)"),
        (lambda: make_plan("magnitude", calib, None), "sparsity"),
        (lambda: make_plan("magnitude", calib, 0.5, alpha=1.0), "no parameter"),
        (lambda: make_plan("strategy", calib, 0.5, alpha=0.1), "not both"),
        (lambda: make_plan("strategy", calib, None), "alpha"),
        (lambda: make_plan("strategy", calib, None, alpha=-1.0), "alpha must be >= 0"),
        (lambda: make_plan("strategy", calib, None, alpha=0.1, focus=[7]), "outside"),
        (lambda: by_step("nope", calib, 0.5), "choose one of: activation, .*magnitude, random, strategy"),
        (lambda: by_step("magnitude", calib, 1.0), r"\[0, 1\)"),
        (lambda: by_step("magnitude", calib, None), "sparsity"),
        (lambda: by_step("magnitude", calib, 0.5, alpha=1.0), "no parameter"),
        (lambda: by_step("strategy", calib, 0.5, alpha=0.1), "not both"),
        (lambda: by_step("magnitude", calib, 0.5, allocation="everywhere"), "allocation"),
        (lambda: by_step("magnitude", calib, 0.5, multiple_of=0), "multiple-of"),
    ]:
        with pytest.raises(UserError, match=msg):
            call()


def test_registry_lists_the_paper_methods():
    assert set(PAPER_METHODS) <= set(SCORERS) and scorer_names() == sorted(SCORERS)
    assert not get_scorer("strategy").needs_sparsity and get_scorer("random").needs_data
    assert not get_scorer("magnitude").needs_data


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_scorers_only_score(calib, name):
    """A scorer returns one finite value per neuron and nothing about allocation or compensation (those are
    the request's); it changes nothing."""
    before = {k: v.clone() for k, v in calib.loaded.model.state_dict().items()}
    s = score(name, calib, 0.4)
    assert isinstance(s, Scores) and [v.shape for v in s.values] == [(37,)] * 3
    assert all(torch.isfinite(v).all() for v in s.values) and s.seed == calib.seed
    assert {f for f in vars(s)} == {"values", "params", "must_keep", "seed", "head_values"}
    assert not any(hasattr(s, k) for k in ("allocation", "compensation", "head_sparsity"))
    assert not hasattr(get_scorer(name), "request_allocates")
    assert not {"allocation", "floor", "multiple_of", "normalize", "ridge", "readout_mix", "head_sparsity"} \
        & set(get_scorer(name).params)   # its options are its own, none of the request's
    after = calib.loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_prune_step_makes_the_plan_of_score_and_allocate(calib, name):
    """The pruning step's plan is the allocator's plan of the scorer's scores; its model is a pruned copy."""
    res = prune_step(calib, PruneRequest(method=name, sparsity=0.4, mode="physical"))
    assert res.plan.keep == make_plan(name, calib, 0.4).keep and res.plan.method == name
    assert res.loaded.model is not calib.loaded.model and res.compensation is None
    assert ffn_widths(res.loaded.model) == res.plan.kept_widths and ffn_widths(calib.loaded.model) == [37] * 3
    assert res.prune_s >= 0 and res.scores is not None


def test_magnitude_scores_by_hand(tiny):
    """||input rows|| x ||output column|| from each family's own weight layout (Conv1D stores [in, out])."""
    got = magnitude_scores(tiny.model)
    base = base_model(tiny.model)
    for site in ffn_sites(tiny.model):
        if tiny.family.name == "gpt2":
            mlp = base.h[site.layer].mlp
            w_in, w_out = mlp.c_fc.weight.t(), mlp.c_proj.weight.t()           # -> [d_ff, d], [d, d_ff]
        elif tiny.family.name == "llama":
            mlp = base.layers[site.layer].mlp
            w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1)  # both rows go with the neuron
            w_out = mlp.down_proj.weight
        else:
            w_in = base.encoder.layer[site.layer].intermediate.dense.weight
            w_out = base.encoder.layer[site.layer].output.dense.weight
        expected = w_in.detach().norm(dim=1) * w_out.detach().norm(dim=0)
        torch.testing.assert_close(got[site.layer], expected)
    assert weight_out_in(get_module(base, ffn_sites(tiny.model)[0].down)).shape == (32, 37)
