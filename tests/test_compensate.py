"""Least-squares compensation of removed FFN neurons and the calibration statistics it is fitted on."""
import copy
import logging
import random

import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply import masked, physical
from anatomy_prune.apply.compensate import compensate
from anatomy_prune.linalg import fit_removed
from anatomy_prune.models.families import base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from anatomy_prune.models.loading import load_model
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.compensation import Compensation, compensation_recipe
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.plan import PruningPlan, plan_from_scores
from anatomy_prune.scores.calibration import Calibration, FFNStats, calibration_pass, ffn_input_stats

from conftest import TEXTS, capture_ffn_hidden, make_classifier

WORDS = " ".join(TEXTS).replace(",", "").replace(".", "").lower().split()


def texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))) for _ in range(n)]


def calib(loaded, n=48, seed=0, max_length=24, batch_size=16, labels=True) -> Calibration:
    t = texts(n, seed)
    return Calibration(loaded, t, [i % 2 for i in range(n)] if labels else None, max_length=max_length,
                       batch_size=batch_size)


def random_plan(model, sparsity=0.5, seed=0) -> PruningPlan:
    g = torch.Generator().manual_seed(seed)
    return plan_from_scores([torch.rand(w, generator=g) for w in ffn_widths(model)], sparsity, seed=seed)


def outputs(loaded, enc) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(**enc)
    if isinstance(out, torch.Tensor):
        return out                                                             # classifier logit [batch]
    return out.logits if loaded.kind == "causal-lm" else out.last_hidden_state


def encode(loaded, t):
    enc = loaded.tokenizer(t, padding=True, truncation=True, max_length=24, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_fit_recovers_an_exact_linear_combination():
    g = torch.Generator().manual_seed(0)
    h_k = torch.randn(400, 6, generator=g, dtype=torch.float64)                 # [tokens, kept]
    mix = torch.randn(6, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    h = torch.cat([h_k, h_k @ mix + c], dim=1)                                  # removed = 6, 7, 8
    z = torch.cat([h, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    coef, info = fit_removed(z.t() @ z, list(range(6)), [6, 7, 8], ridge=0.0)
    torch.testing.assert_close(coef[:6], mix)
    torch.testing.assert_close(coef[6], c)
    assert not info["ill_posed"]


def _duplicate_removed(loaded, plan: PruningPlan, scale: float = 2.0) -> None:
    """Make every removed neuron an exact multiple of a kept one (gated FFNs: scale the up row)."""
    base = base_model(loaded.model)
    with torch.no_grad():
        for site in ffn_sites(loaded.model):
            keep, gone = plan.keep[site.layer], plan.removed(site.layer)
            for i, r in enumerate(gone):
                k = keep[i % len(keep)]
                for n, path in enumerate(site.up):
                    mod = get_module(base, path)
                    w = weight_out_in(mod)
                    factor = scale if n == len(site.up) - 1 and len(site.up) == 2 else 1.0
                    w[r] = w[k] * factor
                    if getattr(mod, "bias", None) is not None:
                        mod.bias[r] = mod.bias[k]


def test_compensation_exactly_recovers_linearly_dependent_neurons(tiny):
    """Removed neurons that copy kept ones (Llama: twice a kept one) are rebuilt exactly: the pruned,
    compensated model computes what the unpruned one did (BERT Linear, GPT-2 Conv1D, bias-free Llama)."""
    plan = random_plan(tiny.model, 0.4)
    _duplicate_removed(tiny, plan)
    enc = encode(tiny, texts(6, seed=9))
    dense = outputs(tiny, enc)
    stats = ffn_input_stats(calib(tiny, labels=False), cache=False, progress=False)
    with masked(tiny.model, plan):
        plain = outputs(tiny, enc)
    report = compensate(tiny.model, plan, stats, ridge=0.0)
    physical(tiny.model, plan)
    got = outputs(tiny, enc)
    assert ffn_widths(tiny.model) == plan.kept_widths
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    assert (plain - dense).abs().max() > 1e-2  # plain removal did change the output
    assert all(e["rel_err_compensated"] < 1e-8 for e in report["layers"])


def test_constant_neuron_goes_into_the_bias():
    """A removed neuron that is constant over tokens is carried by the down bias (Linear with bias)."""
    loaded = load_model("tiny-bert", device="cpu")
    plan = random_plan(loaded.model, 0.3)
    base = base_model(loaded.model)
    with torch.no_grad():
        for site in ffn_sites(loaded.model):
            up = get_module(base, site.up[0])
            gone = plan.removed(site.layer)
            up.weight[gone] = 0.0
            up.bias[gone] = 1.5   # h = gelu(1.5) on every token
    enc = encode(loaded, texts(5, seed=3))
    dense = outputs(loaded, enc)
    stats = ffn_input_stats(calib(loaded, labels=False), cache=False, progress=False)
    report = compensate(loaded.model, plan, stats, ridge=1e-6)
    physical(loaded.model, plan)
    torch.testing.assert_close(outputs(loaded, enc), dense, rtol=1e-4, atol=1e-4)
    assert all(e["intercept"] for e in report["layers"])


@pytest.mark.parametrize("sparsity", [0.2, 0.6, 0.9])
def test_never_worse_than_plain_removal_on_the_calibration_tokens(tiny, sparsity):
    """Layer by layer, on the unpruned model's own activations, the compensated down projection is at
    least as close to the dense output as plain removal, and the diagnostics say the same."""
    cal = calib(tiny, labels=False)
    stats = ffn_input_stats(cal, cache=False, progress=False)
    with torch.no_grad(), capture_ffn_hidden(tiny.model) as acts:
        for b in cal.batches():
            tiny.model(**b)
    masks = torch.cat([b["attention_mask"].flatten() for b in cal.batches()]).bool()
    base = base_model(tiny.model)
    sites = ffn_sites(tiny.model)
    downs = [copy.deepcopy(get_module(base, s.down)) for s in sites]
    plan = random_plan(tiny.model, sparsity, seed=2)
    report = compensate(tiny.model, plan, stats)
    for site, old in zip(sites, downs):
        h = torch.cat([a.flatten(0, 1) for a in acts[site.layer]])[masks]      # [tokens, d_ff]
        new = get_module(base, site.down)
        keep = torch.zeros(h.shape[1])
        keep[list(plan.keep[site.layer])] = 1.0
        with torch.no_grad():
            dense, plain, comp = old(h), old(h * keep), new(h * keep)         # [tokens, d_model]
        err_plain = (plain - dense).pow(2).sum().item()
        err_comp = (comp - dense).pow(2).sum().item()
        assert err_comp <= err_plain * (1 + 1e-6) + 1e-9
        entry = report["layers"][site.layer]
        assert entry["rel_err_compensated"] <= entry["rel_err_removed"] + 1e-9
        assert entry["rel_err_removed"] / max(entry["rel_err_compensated"], 1e-12) == pytest.approx(
            err_plain / max(err_comp, 1e-12), rel=1e-3)


def test_conv1d_orientation_is_kept():
    loaded = load_model("tiny-gpt2", device="cpu")
    site = ffn_sites(loaded.model)[0]
    down = get_module(base_model(loaded.model), site.down)
    before = down.weight.detach().clone()                                      # Conv1D: [d_ff, d_model]
    plan = random_plan(loaded.model, 0.5)
    stats = ffn_input_stats(calib(loaded), cache=False, progress=False)
    compensate(loaded.model, plan, stats)
    assert down.weight.shape == before.shape == (37, 32)
    gone, kept = plan.removed(0), list(plan.keep[0])
    assert torch.equal(down.weight[gone], before[gone])      # removed rows untouched (sliced away later)
    assert not torch.allclose(down.weight[kept], before[kept])


def test_llama_stays_bias_free_and_reloads(tmp_path):
    loaded = load_model("tiny-llama", device="cpu")
    plan = random_plan(loaded.model, 0.5)
    stats = ffn_input_stats(calib(loaded), cache=False, progress=False)
    report = compensate(loaded.model, plan, stats)
    physical(loaded.model, plan)
    assert not any(e["intercept"] for e in report["layers"])
    assert all(getattr(get_module(base_model(loaded.model), s.down), "bias", None) is None
               for s in ffn_sites(loaded.model))
    enc = encode(loaded, texts(3, seed=5))
    expected = outputs(loaded, enc)
    save_model(loaded, tmp_path / "m", plan=plan.to_dict())
    again = load_model(str(tmp_path / "m"), device="cpu")
    torch.testing.assert_close(outputs(again, enc), expected)


def test_too_few_tokens_warns_and_regularises(caplog):
    loaded = load_model("tiny-bert", device="cpu")
    cal = Calibration(loaded, ["great film"], None, max_length=8, batch_size=1)   # 4 tokens, 37 neurons
    stats = ffn_input_stats(cal, cache=False, progress=False)
    plan = random_plan(loaded.model, 0.3)
    with caplog.at_level(logging.WARNING, logger="anatomy_prune.linalg"):
        report = compensate(loaded.model, plan, stats, ridge=1e-4)
    assert "ill-posed" in caplog.text
    assert report["ill_posed_layers"] == [0, 1, 2]
    assert all(e["ridge"] >= 0.1 for e in report["layers"])
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_singular_gram_warns_and_regularises(caplog):
    """A dead kept neuron (always 0) makes the Gram singular; with ridge 0 the fit says so and regularises."""
    loaded = load_model("tiny-llama", device="cpu")
    plan = random_plan(loaded.model, 0.3)
    with torch.no_grad():
        for site in ffn_sites(loaded.model):
            weight_out_in(get_module(base_model(loaded.model), site.up[1]))[plan.keep[site.layer][0]] = 0.0
    stats = ffn_input_stats(calib(loaded, labels=False), cache=False, progress=False)
    with caplog.at_level(logging.WARNING, logger="anatomy_prune.linalg"):
        report = compensate(loaded.model, plan, stats, ridge=0.0)
    assert "singular" in caplog.text
    assert all(e["ill_posed"] and e["ridge"] > 0 for e in report["layers"])


def test_bad_input_is_refused():
    loaded = load_model("tiny-bert", device="cpu")
    stats = ffn_input_stats(calib(loaded, labels=False), cache=False, progress=False)
    plan = random_plan(loaded.model, 0.5)
    wrong = FFNStats(gram=[torch.eye(11, dtype=torch.float64)] * 3, n_tokens=5, n_examples=1)
    with pytest.raises(UserError, match="widths"):
        compensate(loaded.model, plan, wrong)
    for ridge, mix in ((-1.0, 0.0), (0.01, 1.5), ("x", 0.0), (True, 0.0), (float("nan"), 0.0)):
        with pytest.raises(UserError, match="ridge|readout_mix"):
            compensate(loaded.model, plan, stats, ridge=ridge, readout_mix=mix)
    with pytest.raises(UserError, match="does not fit"):
        compensate(loaded.model, PruningPlan(keep=[[0]] * 2, widths=[37, 37]), stats)
    with pytest.raises(UserError, match="empty"):
        ffn_input_stats(Calibration(loaded, [], None), cache=False)
    with pytest.raises(UserError, match="fine-tune"):
        ffn_input_stats(calib(loaded), grads=True, cache=False)


def test_stats_exclude_padding_and_fisher_is_per_example():
    """Token count and Gram ignore padding; Fisher sums squared per-example gradients, so the batch
    size does not change it (a per-batch gradient would)."""
    loaded = make_classifier("tiny-bert")
    pass_one = calibration_pass(calib(loaded, n=12, batch_size=1), cache=False, progress=False)
    pass_four = calibration_pass(calib(loaded, n=12, batch_size=4), cache=False, progress=False)
    one, four = pass_one.ffn, pass_four.ffn
    n_real = sum(int(b["attention_mask"].sum()) for b in calib(loaded, n=12, batch_size=4).batches())
    assert one.n_tokens == four.n_tokens == n_real == one.tokens_per_layer()[0]
    for layer in range(3):
        torch.testing.assert_close(four.gram[layer], one.gram[layer], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(four.fisher[layer], one.fisher[layer], rtol=1e-3, atol=1e-9)
        assert four.fisher[layer].sum() > 0
    assert pass_one.loss == pytest.approx(pass_four.loss, rel=1e-4)


def test_stats_are_shared_through_the_calibration():
    loaded = make_classifier("tiny-bert")
    cal = calib(loaded, n=8)
    first = ffn_input_stats(cal, progress=False)
    assert ffn_input_stats(cal, progress=False) is first
    assert ffn_input_stats(cal, grads=False, progress=False) is first  # gradients not needed: reused
    assert "calibration_pass+grads" in cal.used and cal.timings["calibration_pass+grads"] > 0
    assert ffn_input_stats(cal, cache=False, progress=False) is not first
    assert ffn_input_stats(calib(loaded, n=8), progress=False) is not first  # another Calibration


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_prune_step_never_modifies_its_input_model_or_plan(mode):
    """Compensation works on a copy of the unpruned model with an explicit recipe: the input model, the
    given plan and its params stay as they were, nothing is recorded on the model, and the same step run
    twice gives the same pruned model (the old "compensated twice" mistake cannot happen)."""
    loaded = make_classifier("tiny-gpt2")
    cal = calib(loaded, n=16)
    before = _state(loaded.model)
    plan = random_plan(loaded.model, 0.5)
    plan_before = plan.to_dict()
    first = prune_step(cal, PruneRequest(plan=plan, compensate=True, mode=mode))
    second = prune_step(cal, PruneRequest(plan=plan, compensate=True, mode=mode))
    assert _same(_state(loaded.model), before) and ffn_widths(loaded.model) == [37] * 3
    assert plan.to_dict() == plan_before and first.plan.to_dict() == plan_before
    assert first.compensation is not None and first.compensation == second.compensation
    assert first.loaded.model is not loaded.model and second.loaded.model is not first.loaded.model
    assert _same(_state(first.loaded.model), _state(second.loaded.model))
    assert not _same(_state(first.loaded.model), before)
    assert not any("compensat" in name for m in (loaded.model, first.loaded.model) for name in vars(m))
    # a method with --compensate: the recipe is the request, recorded nowhere on the model or its plan
    made = prune_step(cal, PruneRequest(method="magnitude", sparsity=0.5, compensate=True, mode=mode))
    assert made.plan.params.get("compensate") is None and made.compensation is not None
    assert _same(_state(loaded.model), before)
    # inplace=True prunes the given model itself (and only then)
    same = prune_step(cal, PruneRequest(plan=plan, compensate=True, mode=mode), inplace=True)
    assert same.loaded.model is loaded.model and _same(_state(loaded.model), _state(first.loaded.model))


def test_compensate_uses_the_explicit_recipe_not_the_plan():
    """compensate() reads ridge / readout_mix from its arguments only: plan params change nothing, and
    the plan is left as it was."""
    loaded = make_classifier("tiny-bert")
    stats = ffn_input_stats(calib(loaded), cache=False, progress=False)
    plain = random_plan(loaded.model, 0.5)
    loud = plain.with_info(params={"compensate": True, "ridge": 500.0, "readout_mix": 1.0})
    a, b, c = (copy.deepcopy(loaded.model) for _ in range(3))
    ra = compensate(a, plain, stats, ridge=0.01)
    rb = compensate(b, loud, stats, ridge=0.01)
    rc = compensate(c, plain, stats, ridge=500.0)
    assert _same(_state(a), _state(b)) and ra["layers"] == rb["layers"]
    assert not _same(_state(a), _state(c)) and rc["ridge"] == 500.0
    assert loud.params == {"compensate": True, "ridge": 500.0, "readout_mix": 1.0}


def test_compensation_recipe():
    """A plan's recorded recipe (older plans: compensate / compensated, ridge, readout_mix in params) replays;
    the request's options go over it; a plain request is least squares without readout weight."""
    plan = PruningPlan(keep=[[0, 1]], widths=[4])
    assert compensation_recipe(plan, False) is None and compensation_recipe(plan, None) is None
    plain = {"kind": "refit", "ridge": 0.01, "readout_mix": 0.0, "tune": False, "own": False}
    assert compensation_recipe(plan, True) == plain == compensation_recipe(plan, Compensation())
    own = plan.with_info(params={"compensate": True, "ridge": 0.5, "readout_mix": 0.25})
    assert compensation_recipe(own, False) == {"kind": "refit", "ridge": 0.5, "readout_mix": 0.25, "tune": False,
                                               "own": True}
    assert compensation_recipe(own, True) == compensation_recipe(own, False)          # --compensate: the plan's
    assert compensation_recipe(own, Compensation(ridge=2.0))["ridge"] == 2.0          # an option given wins
    assert compensation_recipe(own, Compensation(kind="bias"))["kind"] == "bias"
    older = plan.with_info(params={"compensated": True, "readout_mix": 0.5})
    assert compensation_recipe(older, False) == {"kind": "refit", "ridge": 0.01, "readout_mix": 0.5, "tune": False,
                                                 "own": True}
    tuned = plan.with_info(params={"compensate": True, "tune": True})
    assert compensation_recipe(tuned, False)["tune"] is True                         # a tuned plan replays it
    bias = plan.with_info(params={"compensate": True, "compensation": "bias"})
    assert compensation_recipe(bias, False)["kind"] == "bias"
    for params, msg in (({"compensate": True, "ridge": "lots"}, "ridge"),
                        ({"compensate": True, "compensation": "magic"}, "compensation"),
                        ({"compensate": True, "tune": "yes"}, "the plan's tune must be true or false")):
        with pytest.raises(UserError, match=msg):
            compensation_recipe(plan.with_info(params=params), False)
