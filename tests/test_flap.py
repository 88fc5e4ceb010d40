"""The FLAP-style pieces: the fluctuation score, bias compensation and the parameter cost model."""
import copy

import torch

from anatomy_prune.apply import physical
from anatomy_prune.apply.bias import bias_compensate
from anatomy_prune.evaluate.cost import params_cost
from anatomy_prune.evaluate.counts import count_params
from anatomy_prune.models.families import base_model, ffn_sites, get_module, weight_out_in
from anatomy_prune.models.loading import load_model
from anatomy_prune.models.surgery import keep_ffn_neurons, keep_heads
from anatomy_prune.plan import PruningPlan
from anatomy_prune.scores import score
from anatomy_prune.scores.calibration import calibration_pass

from conftest import capture_ffn_hidden
from test_compensate import calib, encode, texts


def _down_outputs(loaded, enc, layer):
    """What block `layer`'s down projection writes, per real token: [tokens, d_model]."""
    base = base_model(loaded.model)
    down = get_module(base, ffn_sites(loaded.model)[layer].down)
    seen = []
    h = down.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        loaded.model(**enc)
    h.remove()
    return seen[0][enc["attention_mask"].bool()]


def test_fluctuation_is_variance_times_column_norm():
    loaded = load_model("tiny-llama")
    c = calib(loaded, labels=False)
    sc = score("fluctuation", c, 0.5)
    masks = []
    with capture_ffn_hidden(loaded.model) as acts:                 # per layer, [batch, pos, d_ff] per batch
        for b in c.batches():
            masks.append(b["attention_mask"].bool())
            with torch.no_grad():
                loaded.model(**b)
    base = base_model(loaded.model)
    for site, got in zip(ffn_sites(loaded.model), sc.values):
        x = torch.cat([a[m] for a, m in zip(acts[site.layer], masks)]).double()   # [real tokens, d_ff]
        w = weight_out_in(get_module(base, site.down)).double()
        want = x.var(dim=0, unbiased=False) * w.pow(2).sum(0)
        assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-9)


def test_bias_compensation_keeps_the_mean_output_and_gives_llama_a_bias():
    loaded = load_model("tiny-llama")
    c = calib(loaded, labels=False)
    stats = calibration_pass(c, grads=False)
    g = torch.Generator().manual_seed(1)
    keep = [sorted(torch.randperm(w, generator=g)[: w // 2].tolist()) for w in stats.ffn.widths]
    plan = PruningPlan(keep=keep, widths=stats.ffn.widths)
    enc = encode(loaded, c.texts)
    dense_mean = _down_outputs(loaded, enc, 0).double().mean(0)
    plain, comp = copy.deepcopy(loaded), copy.deepcopy(loaded)
    report = bias_compensate(comp.model, plan, stats)
    physical(plain.model, plan), physical(comp.model, plan)
    assert get_module(base_model(comp.model), ffn_sites(comp.model)[0].down).bias is not None
    # block 0 sees the same inputs in all three models, so its mean output is rebuilt exactly by the bias
    gap_plain = (_down_outputs(plain, enc, 0).double().mean(0) - dense_mean).norm()
    gap_comp = (_down_outputs(comp, enc, 0).double().mean(0) - dense_mean).norm()
    assert gap_comp < 1e-4 * max(1.0, float(dense_mean.norm())) < gap_plain
    assert 0 <= report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]


def test_params_cost_predicts_the_pruned_parameter_count():
    for alias in ("tiny-bert", "tiny-gpt2", "tiny-llama"):
        loaded = load_model(alias)
        cm = params_cost(loaded)
        assert cm.dense == count_params(loaded.model)
        n = [w // 2 for w in cm.neurons]
        h = [max(1, u // 2) for u in cm.heads]
        m = keep_heads(keep_ffn_neurons(copy.deepcopy(loaded.model), [range(k) for k in n]), [range(k) for k in h])
        assert cm.predict(n, h) == count_params(m), alias


def test_a_params_target_is_met_by_every_head_scoring_method():
    """--target-params: magnitude, fluctuation (FLAP's defaults: standardised ranking, bias compensation) and
    calibrated all land within one unit's cost of the budget, with heads and neurons removed."""
    from anatomy_prune.pipeline.requests import PruneRequest
    from anatomy_prune.pipeline.step import prune_step

    for alias in ("tiny-gpt2", "tiny-llama"):
        loaded = load_model(alias)
        dense = count_params(loaded.model)
        cm = params_cost(loaded)
        keep = 1 - 0.4 * (dense - cm.base) / dense      # 40% of what pruning can remove (embeddings dominate)
        c = calib(loaded, labels=False)
        for method in ("magnitude", "fluctuation", "calibrated"):
            res = prune_step(c, PruneRequest(method=method, target={"params": keep}))
            n = count_params(res.loaded.model)
            # bias compensation gives Llama's bias-free down and o projections a bias (d_model each per block)
            d = base_model(loaded.model).config.hidden_size
            added = 2 * d * len(cm.neurons) if (method, alias) == ("fluctuation", "tiny-llama") else 0
            assert keep * dense - max(cm.per_neuron + cm.per_head) < n - added <= keep * dense, (alias, method)
            assert res.plan.heads is not None and res.plan.neurons_removed > 0, (alias, method)   # heads scored
            assert res.cost_model["kind"] == "params" and res.cost_model["predicted"] == n - added
            if method == "fluctuation":
                assert res.compensation["kind"] == "bias" and res.plan.params["normalize"] == "standard"


def test_head_magnitude_reads_the_units_own_rows_in_a_fused_projection():
    from anatomy_prune.models.families import attention_sites
    from anatomy_prune.scores.basic import head_magnitude_scores

    loaded = load_model("tiny-gpt2")
    site = attention_sites(loaded.model)[0]
    base = base_model(loaded.model)
    c_attn = weight_out_in(get_module(base, site.q)).detach()          # [3 * width, d]
    width = site.n_heads * site.head_dim
    with torch.no_grad():                                              # unit 1's v rows (and only those) x 10
        c_attn[2 * width + site.head_dim: 2 * width + 2 * site.head_dim] *= 10
    before = head_magnitude_scores(load_model("tiny-gpt2").model)[0]
    after = head_magnitude_scores(loaded.model)[0]
    changed = (after - before).abs() > 1e-4 * before.abs()
    assert changed.tolist() == [u == 1 for u in range(site.n_units)]


def test_a_bias_compensated_llama_saves_and_reloads_exactly(tmp_path):
    """The biases bias compensation adds to Llama's down / o projections are listed in anatomy_prune.json and
    rebuilt on load; a listed path that is not an output projection is refused."""
    import json

    from anatomy_prune.errors import UserError
    from anatomy_prune.models.saved import save_model
    from anatomy_prune.pipeline.requests import PruneRequest
    from anatomy_prune.pipeline.step import prune_step

    loaded = load_model("tiny-llama")
    res = prune_step(calib(loaded, labels=False), PruneRequest(method="fluctuation", sparsity=0.5))
    folder = save_model(res.loaded, tmp_path / "m", plan=res.plan.to_dict())
    back = load_model(str(folder))
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(res.loaded.model(input_ids=x).logits, back.model(input_ids=x).logits)
    meta = json.loads((folder / "anatomy_prune.json").read_text())
    assert meta["output_biases"] == [s.down for s in ffn_sites(loaded.model)]   # FFN only: the down projections
    meta["output_biases"][0] = "embed_tokens"
    (folder / "anatomy_prune.json").write_text(json.dumps(meta))
    try:
        load_model(str(folder))
        raise AssertionError("a bad output_biases entry was accepted")
    except UserError as exc:
        assert "output_biases" in str(exc)
