import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.families import base_model
from anatomy_prune.hooks import capture_ffn_activations
from anatomy_prune.methods import (METHODS, Calibration, activation_stats, default_focus, important_neurons,
                                   make_plan, map_focus, similarity_stats, strategy_thresholds)
from anatomy_prune.plan import plan_from_scores

from conftest import TEXTS

CALIB_TEXTS = TEXTS + ["Not bad at all.", "The worst film of the year, by far and away.",
                       "A quiet, tender story; I loved every minute of it.", "Meh."]
PAPER_METHODS = ("random", "magnitude", "strategy", "activation")


@pytest.fixture
def calib(tiny) -> Calibration:
    return Calibration(tiny, CALIB_TEXTS, max_length=32, batch_size=3, seed=0)


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_plan_size_is_exact_at_a_target_sparsity(calib, name):
    plan = make_plan(name, calib, 0.4)
    assert plan.method == name and plan.widths == [37, 37, 37]
    if name == "strategy":  # one global count, from the rule's solved alpha
        assert plan.neurons_removed == round(0.4 * 111)
        assert plan.params["alpha_solved"] and plan.params["alpha"] > 0
    else:  # the same fraction in every layer
        assert plan.removed_per_layer == [round(0.4 * 37)] * 3
    assert plan.params["target_sparsity"] == 0.4
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
    plan = plan_from_scores([torch.rand(10)], 0.8, protect=[[0, 1, 2, 3, 4]])
    assert set(range(5)) <= set(plan.keep[0]) and len(plan.keep[0]) == 5


def test_activation_is_the_mean_over_real_tokens(calib):
    model, tok = calib.loaded.model, calib.loaded.tokenizer
    got = activation_stats(calib)
    total, n = None, 0
    for text in CALIB_TEXTS:  # one text per pass: no padding at all
        enc = tok([text], truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad(), capture_ffn_activations(model) as acts:
            base_model(model)(**enc)
        s = torch.stack([a[0][0].abs().sum(dim=0) for a in acts])  # [layers, d_ff]
        total = s if total is None else total + s
        n += enc["input_ids"].shape[1]
    torch.testing.assert_close(torch.stack(got), total / n, rtol=1e-4, atol=1e-6)


def test_statistics_are_computed_once_and_charged(calib):
    make_plan("strategy", calib, 0.3)
    assert {"forward", "similarity"} <= calib.used
    first = dict(calib.timings)
    calib.used.clear()
    make_plan("activation", calib, 0.3)  # reuses the same forward pass
    assert calib.timings == first and "forward" in calib.used and "similarity" not in calib.used


def test_multiple_of_rounds_kept_widths(calib):
    for name in ("magnitude", "strategy"):
        plan = make_plan(name, calib, 0.5, multiple_of=8)
        assert all(w % 8 == 0 or w == 37 for w in plan.kept_widths)


def test_bad_input():
    from anatomy_prune import load_model
    calib = Calibration(load_model("tiny-bert", device="cpu"), CALIB_TEXTS, max_length=32)
    for call, msg in [
        (lambda: make_plan("nope", calib, 0.5), "choose one of: activation, .*magnitude, random, strategy"),
        (lambda: make_plan("magnitude", calib, 1.0), r"\[0, 1\)"),
        (lambda: make_plan("magnitude", calib, -0.1), r"\[0, 1\)"),
        (lambda: make_plan("magnitude", calib, None), "sparsity"),
        (lambda: make_plan("magnitude", calib, 0.5, alpha=1.0), "no parameter"),
        (lambda: make_plan("strategy", calib, 0.5, alpha=0.1), "not both"),
        (lambda: make_plan("strategy", calib, None), "alpha"),
        (lambda: make_plan("strategy", calib, None, alpha=-1.0), "non-negative"),
        (lambda: make_plan("strategy", calib, None, alpha=0.1, focus=[7]), "outside"),
    ]:
        with pytest.raises(UserError, match=msg):
            call()


def test_registry_lists_the_paper_methods():
    assert set(PAPER_METHODS) <= set(METHODS)
    assert not METHODS["strategy"].needs_sparsity and METHODS["random"].needs_data
    assert not METHODS["magnitude"].needs_data
