"""Attention heads as prunable units (issue 16), for every supported model type: a plan that removes
different numbers of heads per layer (one layer loses all, one keeps all) plus some FFN neurons gives the
same outputs masked (hooks), masked in place and physically removed; the parameter count drops by exactly
the removed rows and columns; the model saves and reloads in a fresh process with the same outputs and head
counts. Under grouped-query attention (the Llama family) the unit is a key/value group with its query heads.
Plans with heads round-trip through JSON and bad ones are one-line UserErrors."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from anatomy_prune.apply.modes import mask, masked, physical
from anatomy_prune.errors import UserError
from anatomy_prune.hooks import run_with_hooks
from anatomy_prune.models.families import (attention_sites, base_model, ffn_sites, ffn_widths, get_module, head_counts,
                                           in_features, query_head_counts, weight_out_in)
from anatomy_prune.models.loading import TINY, TINY_TYPES, Loaded, load_model
from anatomy_prune.models.saved import save_model
from anatomy_prune.models.surgery import HeadlessAttention, keep_heads
from anatomy_prune.plan.plan import PruningPlan

from conftest import TEXTS, reload_in_fresh_process

GQA = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo")  # the tiny ones: 4 query heads, 2 key/value heads


def encode(loaded: Loaded, texts=TEXTS) -> dict:
    enc = loaded.tokenizer(list(texts), padding=True, truncation=True, max_length=24, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def outputs(loaded: Loaded) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(**encode(loaded))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def heads_plan(loaded: Loaded, seed: int = 0) -> PruningPlan:
    """Layer 0 loses every head, layer 1 keeps the odd units (1, 3: not a prefix), the last keeps all; every
    layer loses some FFN neurons."""
    widths, units = ffn_widths(loaded.model), head_counts(loaded.model)
    g = torch.Generator().manual_seed(seed)
    keep = [sorted(torch.randperm(w, generator=g)[:w // 2 + i].tolist()) for i, w in enumerate(widths)]
    heads = [[] if i == 0 else list(range(u)) if i == len(units) - 1 else list(range(1, u, 2))
             for i, u in enumerate(units)]
    return PruningPlan(keep=keep, widths=widths, heads=heads, head_widths=units, method="heads-test")


def expected_drop(loaded: Loaded, plan: PruningPlan) -> int:
    """Parameters the plan removes, counted from the unpruned model's shapes: FFN rows and columns, and per
    removed unit its q / k / v rows (biases included) and its query heads' o columns; a layer left without
    heads keeps only o's bias."""
    base = base_model(loaded.model)
    drop = 0
    for site in ffn_sites(loaded.model):
        gone = plan.removed_per_layer[site.layer]
        for path in site.up:
            m = get_module(base, path)
            drop += gone * (in_features(m) + (m.bias is not None))
        drop += gone * weight_out_in(get_module(base, site.down)).shape[0]
    for site in attention_sites(loaded.model):
        gone = len(plan.removed_heads(site.layer))
        q_rows, kv_rows = gone * site.group * site.head_dim, gone * site.head_dim
        for path, rows in ((site.q, q_rows), (site.k, kv_rows), (site.v, kv_rows)):  # fused: c_attn's 3 parts
            m = get_module(base, path)
            drop += rows * (in_features(m) + (m.bias is not None))
        drop += q_rows * weight_out_in(get_module(base, site.o)).shape[0]
        if gone == site.n_units:  # a headless layer also loses its per-head norms (Qwen3's q_norm / k_norm)
            own = {id(p) for path in (site.q, site.k, site.v, site.o) for p in get_module(base, path).parameters()}
            drop += sum(p.numel() for p in get_module(base, site.attn).parameters() if id(p) not in own)
    return drop


def n_params(loaded: Loaded) -> int:
    return sum(p.numel() for p in loaded.model.parameters())


# --- every type: masked == in-place mask == physical; parameters; save -> reload in a fresh process ------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every type pruned by heads_plan three ways, saved, and reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("heads")
    res, folders = {}, {}
    for t, alias in TINY_TYPES.items():
        loaded = load_model(alias, device="cpu")
        plan = heads_plan(loaded)
        r = {"plan": plan, "dense": outputs(loaded), "params": n_params(loaded), "drop": expected_drop(loaded, plan)}
        with masked(loaded.model, plan):
            r["masked"] = outputs(loaded)
        twin = Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.kind, alias)
        mask(twin.model, plan)
        r["mask"], r["mask_params"] = outputs(twin), n_params(twin)
        physical(loaded.model, plan)
        r["physical"], r["pruned_params"] = outputs(loaded), n_params(loaded)
        r["heads"], r["query_heads"] = head_counts(loaded.model), query_head_counts(loaded.model)
        r["widths"] = ffn_widths(loaded.model)
        r["loaded"] = loaded
        folders[t] = str(save_model(loaded, root / t, plan=plan.to_dict()))
        res[t] = r
    got = reload_in_fresh_process(list(folders.values()), TEXTS)
    for t in TINY_TYPES:
        res[t]["reloaded"], res[t]["folder"] = got[folders[t]], Path(folders[t])
    return res


TYPES = sorted(TINY_TYPES)


@pytest.mark.xdist_group("heads-pruned")  # the module fixture is built once, on one pytest-xdist worker
@pytest.mark.parametrize("model_type", TYPES)
def test_masked_equals_physical(pruned, model_type):
    r = pruned[model_type]
    assert not torch.allclose(r["masked"], r["dense"])  # the plan changes the model
    torch.testing.assert_close(r["physical"], r["masked"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["mask"], r["masked"], rtol=1e-5, atol=1e-5)
    assert r["mask_params"] == r["params"]  # masking in place keeps every shape


@pytest.mark.xdist_group("heads-pruned")  # the module fixture is built once, on one pytest-xdist worker
@pytest.mark.parametrize("model_type", TYPES)
def test_head_counts_and_parameters_drop_by_the_removed_rows(pruned, model_type):
    r = pruned[model_type]
    plan, heads = r["plan"], TINY["heads"]
    units = 2 if model_type in GQA else heads  # tiny GQA models: 2 key/value groups of 2 query heads
    group = heads // units
    assert plan.head_widths == (units,) * TINY["layers"]
    assert r["heads"] == plan.kept_heads == [0, units // 2, units]
    assert r["query_heads"] == [k * group for k in plan.kept_heads]
    assert r["widths"] == plan.kept_widths
    assert r["drop"] > 0 and r["params"] - r["pruned_params"] == r["drop"]
    layer0 = get_module(base_model(r["loaded"].model), attention_sites(r["loaded"].model)[0].attn)
    assert isinstance(layer0, HeadlessAttention)


@pytest.mark.xdist_group("heads-pruned")  # the module fixture is built once, on one pytest-xdist worker
@pytest.mark.parametrize("model_type", TYPES)
def test_heads_save_and_reload_in_a_fresh_process(pruned, model_type):
    r = pruned[model_type]
    got = r["reloaded"]
    meta = json.loads((r["folder"] / "anatomy_prune.json").read_text())
    assert meta["attn_heads"] == r["heads"] and meta["plan"]["heads"] == [list(h) for h in r["plan"].heads]
    assert got["heads"] == r["heads"] and got["query_heads"] == r["query_heads"] and got["widths"] == r["widths"]
    o = r["physical"]
    assert got["sum"] == pytest.approx(float(o.double().sum()), rel=1e-5, abs=1e-4)
    torch.testing.assert_close(torch.tensor(got["first"]), o.flatten()[:8], rtol=1e-5, atol=1e-5)


# --- grouped-query attention: the unit is a key/value group --------------------------------------------

def test_gqa_removing_one_group_removes_its_query_heads():
    loaded = load_model("tiny-llama", device="cpu")
    base = base_model(loaded.model)
    site = attention_sites(loaded.model)[1]
    assert (site.n_heads, site.n_kv_heads, site.group, site.head_dim) == (4, 2, 2, 8)
    q, k, v, o = (weight_out_in(get_module(base, p)).detach().clone() for p in (site.q, site.k, site.v, site.o))
    before = sum(p.numel() for p in loaded.model.parameters())
    keep_heads(loaded.model, [[0, 1], [1], [0, 1]])  # layer 1 loses group 0: query heads 0, 1 and k/v head 0
    # q: 2 heads x 8 rows of 32, k and v: 8 rows of 32 each, o: 16 columns of 32 (no biases in Llama)
    assert before - sum(p.numel() for p in loaded.model.parameters()) == 16 * 32 + 8 * 32 + 8 * 32 + 32 * 16
    assert head_counts(loaded.model) == [2, 1, 2] and query_head_counts(loaded.model) == [4, 2, 4]
    attn = get_module(base, site.attn)
    assert attn.num_key_value_groups == 2  # what the attention reads: unchanged, as the groups are whole
    torch.testing.assert_close(attn.q_proj.weight, q[16:32])
    torch.testing.assert_close(attn.k_proj.weight, k[8:16])
    torch.testing.assert_close(attn.v_proj.weight, v[8:16])
    torch.testing.assert_close(attn.o_proj.weight, o[:, 16:32])
    with pytest.raises(ValueError, match="distinct and in"):
        keep_heads(loaded.model, [[0, 1], [2], [0, 1]])  # ids are the units the model has now


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_cached_decoding_with_a_headless_layer(alias):
    """A layer without heads still counts positions in the key/value cache, so decoding token by token
    equals a full forward pass (layer 0 is the one transformers asks for the cache length)."""
    loaded = load_model(alias, device="cpu")
    units = head_counts(loaded.model)
    keep_heads(loaded.model, [[], [1], list(range(units[2]))])
    ids = encode(loaded, TEXTS[:1])["input_ids"]
    with torch.no_grad():
        full = loaded.model(input_ids=ids).logits[:, -1]
        cache = loaded.model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        assert cache.get_seq_length() == ids.shape[1] - 1
        step = loaded.model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


# --- hook point, partial plans -------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_attn_heads_hook_point_sees_the_concatenated_heads(alias):
    loaded = load_model(alias, device="cpu")
    enc = encode(loaded, TEXTS[:2])
    seen = []
    with torch.no_grad(), run_with_hooks(loaded.model, {"attn.*.heads": lambda x, p: seen.append((p, x.shape))}):
        loaded.model(**enc)
    assert [p for p, _ in seen] == ["attn.0.heads", "attn.1.heads", "attn.2.heads"]
    assert all(s == (*enc["input_ids"].shape, TINY["hidden"]) for _, s in seen)  # 4 heads x head_dim 8
    keep_heads(loaded.model, [[], [1], list(range(head_counts(loaded.model)[2]))])
    seen.clear()
    with torch.no_grad(), run_with_hooks(loaded.model, {"attn.*.heads": lambda x, p: seen.append(x.shape[-1])}):
        loaded.model(**enc)
    assert seen == [0, 8 * query_head_counts(loaded.model)[1], TINY["hidden"]]


def test_heads_only_and_ffn_only_plans(tiny):
    widths, units = ffn_widths(tiny.model), head_counts(tiny.model)
    only_heads = PruningPlan(keep=[range(w) for w in widths], widths=widths, heads=[[0], [], range(units[2])],
                             head_widths=units)
    twin = copy.deepcopy(tiny.model)
    physical(twin, only_heads)
    assert ffn_widths(twin) == widths and head_counts(twin) == [1, 0, units[2]]
    only_ffn = PruningPlan(keep=[range(w // 2) for w in widths], widths=widths)
    attn_before = [get_module(base_model(tiny.model), s.attn) for s in attention_sites(tiny.model)]
    physical(tiny.model, only_ffn)
    assert [get_module(base_model(tiny.model), s.attn) for s in attention_sites(tiny.model)] == attn_before
    assert head_counts(tiny.model) == units and only_ffn.kept_heads is None and only_ffn.heads_removed == 0


# --- plans with heads: JSON, validation ----------------------------------------------------------------

def test_plans_with_heads_round_trip_through_json(tmp_path):
    plan = PruningPlan(keep=[[0, 2], [1]], widths=[3, 3], heads=[(2, 0), []], head_widths=[4, 2], method="m",
                       params={"a": 1}, seed=3)
    assert plan.heads == ((0, 2), ()) and plan.kept_heads == [2, 0] and plan.heads_removed == 4
    assert plan.removed_heads(0) == [1, 3] and plan.head_sparsity == pytest.approx(4 / 6)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["heads"] == [[0, 2], []] and d["head_widths"] == [4, 2] and d["summary"]["heads_removed"] == 4
    assert PruningPlan.from_dict(d) == plan
    plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json") == plan
    assert plan.with_info(method="other").heads == plan.heads
    ffn_only = PruningPlan(keep=[[0]], widths=[2]).to_dict()
    assert "heads" not in ffn_only and "head_widths" not in ffn_only and "heads_removed" not in ffn_only["summary"]


BAD = {
    "out of range": (dict(heads=[[0, 4], [0]], head_widths=[4, 4]), "kept head ids must be distinct and in [0, 4)"),
    "duplicate": (dict(heads=[[1, 1], [0]], head_widths=[4, 4]), "distinct"),
    "not whole numbers": (dict(heads=[[0.5], [0]], head_widths=[4, 4]), "whole numbers"),
    "wrong layer count (widths)": (dict(heads=[[0], [0]], head_widths=[4, 4, 4]), "3 head widths for 2 layers"),
    "wrong layer count (heads)": (dict(heads=[[0]], head_widths=[4, 4]), "1 layers of kept heads for 2"),
    "heads without widths": (dict(heads=[[0], [0]]), "go together"),
    "zero width": (dict(heads=[[], [0]], head_widths=[0, 4]), "positive whole numbers"),
    "huge width": (dict(heads=[[], [0]], head_widths=[1 << 40, 4]), "at most"),
    "every head removed": (dict(heads=[[], []], head_widths=[4, 4]), "keeps no attention head"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_head_plans_are_one_line_user_errors(case, tmp_path):
    fields, message = BAD[case]
    with pytest.raises(UserError, match=re.escape(message)) as exc:
        PruningPlan(keep=[[0], [0]], widths=[2, 2], **fields)
    assert "\n" not in str(exc.value)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"keep": [[0], [0]], "widths": [2, 2], **fields}))
    with pytest.raises(UserError, match="plan file") as exc:
        PruningPlan.load(path)
    assert "\n" not in str(exc.value)


def test_a_gqa_plan_naming_query_heads_does_not_fit():
    loaded = load_model("tiny-llama", device="cpu")
    widths = ffn_widths(loaded.model)
    plan = PruningPlan(keep=[range(w) for w in widths], widths=widths, heads=[[0, 1, 2], [3], [0]],
                       head_widths=query_head_counts(loaded.model))  # [4, 4, 4]: query heads, not groups
    for apply in (physical, mask):
        want = r"head widths \[4, 4, 4\] vs the model's \[2, 2, 2\].*key/value groups"
        with pytest.raises(UserError, match=want) as exc:
            apply(loaded.model, plan)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="key/value groups"), masked(loaded.model, plan):
        pass
    assert head_counts(loaded.model) == [2, 2, 2]  # nothing was applied


# --- saved metadata is checked before anything is built ------------------------------------------------

@pytest.mark.xdist_group("heads-pruned")  # the module fixture is built once, on one pytest-xdist worker
@pytest.mark.parametrize("bad", [[0, 1], [0, 1, 5], [0, "1", 2], "0,1,2", [0, -1, 2], [0, True, 2]])
def test_bad_attn_heads_metadata_is_a_one_line_user_error(pruned, bad, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(pruned["bert"]["folder"], folder)
    meta = json.loads((folder / "anatomy_prune.json").read_text())
    meta["attn_heads"] = bad
    (folder / "anatomy_prune.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="attn_heads") as exc:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(exc.value)


@pytest.mark.xdist_group("heads-pruned")  # the module fixture is built once, on one pytest-xdist worker
def test_a_damaged_mpnet_head_index_is_a_user_error(pruned, tmp_path):
    """MPNet's pruned layers keep the ids of their heads (the shared position bias is indexed by them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(pruned["mpnet"]["folder"], folder)
    state = load_file(folder / "model.safetensors")
    key = "encoder.layer.1.attention.attn.head_index"
    assert state[key].tolist() == [1, 3]
    state[key] = torch.tensor([1, 9])
    save_file(state, folder / "model.safetensors")
    with pytest.raises(UserError, match="head_index"):
        load_model(str(folder), device="cpu")


# --- head statistics: removal error, joint scores, compensation ----------------------------------------

def head_calibration(alias: str):
    from anatomy_prune.scores.calibration import Calibration, calibration_pass

    loaded = load_model(alias, device="cpu")
    cal = Calibration(loaded, TEXTS * 2, max_length=24, batch_size=3)
    return loaded, cal, calibration_pass(cal, grads=True, heads=True, progress=False).heads


def contexts(loaded: Loaded, cal) -> list[torch.Tensor]:
    """Per layer, what the output projection receives over the calibration texts' real tokens: [tokens, features]."""
    from anatomy_prune.hooks import layer_of

    rows, mask = [[] for _ in attention_sites(loaded.model)], {}
    with torch.no_grad(), run_with_hooks(loaded.model, {"attn.*.heads": lambda x, p: rows[layer_of(p)].append(x[mask["m"]])}):
        for b in cal.batches():
            mask["m"] = b["attention_mask"].bool()                              # [batch, pos]
            loaded.model(**b)
    return [torch.cat(r).double() for r in rows]


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])  # o with a bias (centred) and without
def test_head_removal_error_is_the_direct_output_error(alias):
    from anatomy_prune.scores.calibrated import head_removal_error

    loaded, cal, stats = head_calibration(alias)
    base = base_model(loaded.model)
    got = head_removal_error(loaded.model, stats)
    for site, c in zip(attention_sites(loaded.model), contexts(loaded, cal)):
        o = get_module(base, site.o)
        w = weight_out_in(o).detach().double()
        if o.bias is not None:
            c = c - c.mean(0)                                                 # the mean goes into the bias
        want = [float((c[:, site.q_features([u])] @ w[:, site.q_features([u])].t()).pow(2).sum(1).mean())
                for u in range(site.n_units)]
        torch.testing.assert_close(got[site.layer], torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-7)
        assert min(want) > 0


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_rebuilt_head_error_is_each_units_step_on_the_removal_path(alias):
    """With rebuilt=True a head unit's score is its step on the layer's removal path: the first unit removed
    scores what the other heads cannot rebuild of it (the leave-one-out refit error, at most its direct error),
    the steps in path order never decrease, and they add up to at least the error of removing the whole layer."""
    from anatomy_prune.linalg import removal_path, second_moment, unexplained_blocks
    from anatomy_prune.scores.calibrated import head_removal_error

    loaded, cal, stats = head_calibration(alias)
    base = base_model(loaded.model)
    raw = head_removal_error(loaded.model, stats)
    got = head_removal_error(loaded.model, stats, rebuilt=True, ridge=1e-2)
    for site, g, r, e in zip(attention_sites(loaded.model), stats.gram, raw, got):
        o = get_module(base, site.o)
        w = weight_out_in(o).detach().double()
        m2 = second_moment(g, centred=getattr(o, "bias", None) is not None)
        blocks = [site.q_features([u]) for u in range(site.n_units)]
        order, path = removal_path(g, w, m2, blocks, 1e-2)
        loo = [min(float(r[u]), float(torch.trace(w[:, blocks[u]] @ left @ w[:, blocks[u]].t())))
               for u, left in enumerate(unexplained_blocks(g, blocks, 1e-2))]
        assert float(e[order[0]]) == pytest.approx(min(loo), rel=1e-4, abs=1e-9) and order[0] == loo.index(min(loo))
        steps = [float(e[u]) for u in order]
        assert all(b >= a for a, b in zip(steps, steps[1:]))
        assert sum(steps) >= path[-1] * (1 - 1e-4) > 0


def test_joint_scores_share_one_scale_and_protect_a_loud_head():
    from anatomy_prune.scores.calibrated import joint_scores
    from anatomy_prune.scores.calibration import ffn_input_stats

    loaded, cal, heads = head_calibration("tiny-llama")
    ffn = ffn_input_stats(cal, progress=False)
    n_plain, h_plain = joint_scores(ffn, heads, loaded.model, beta=0.0)
    f_mean = torch.cat([f.float() for f in ffn.fisher + heads.fisher]).mean()
    for got, fisher in zip(n_plain + h_plain, ffn.fisher + heads.fisher):
        torch.testing.assert_close(got * f_mean, fisher.float(), rtol=1e-5, atol=0)
    site = attention_sites(loaded.model)[1]
    quiet = int(torch.argmin(h_plain[1]))
    with torch.no_grad():
        weight_out_in(get_module(base_model(loaded.model), site.o))[:, site.q_features([quiet])] *= 100.0
    n_aware, h_aware = joint_scores(ffn, heads, loaded.model, beta=1.0)
    assert int(torch.argmax(h_aware[1])) == quiet
    assert float(torch.cat(n_aware + h_aware).mean()) == pytest.approx(2.0, rel=1e-5)   # 1 (Fisher) + 1 (error)


def test_head_compensation_removes_reconstruction_error_and_changes_nothing_without_removals():
    """Removing head units of the output projection: the refit lowers the error of o's output on the
    calibration contexts (measured directly, as the report says); a plan that removes no head leaves o as it was."""
    from anatomy_prune.apply.compensate import compensate_heads

    loaded, cal, stats = head_calibration("tiny-gpt2")
    widths, units = ffn_widths(loaded.model), head_counts(loaded.model)
    keep_all = PruningPlan(keep=[range(w) for w in widths], widths=widths, heads=[range(u) for u in units],
                           head_widths=units)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    report = compensate_heads(loaded.model, keep_all, stats)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())
    assert report["mean_rel_err_removed"] == report["mean_rel_err_compensated"] == 0.0
    plan = PruningPlan(keep=[range(w) for w in widths], widths=widths, heads=[[0, 2], [1], [0, 1, 3]], head_widths=units)
    base, ctx = base_model(loaded.model), contexts(loaded, cal)
    olds = [copy.deepcopy(get_module(base, s.o)) for s in attention_sites(loaded.model)]
    report = compensate_heads(loaded.model, plan, stats, ridge=1e-6)
    for site, c, old in zip(attention_sites(loaded.model), ctx, olds):
        keep = torch.zeros(c.shape[1], dtype=torch.float64)
        keep[site.q_features(list(plan.heads[site.layer]))] = 1.0
        new = get_module(base, site.o)
        with torch.no_grad():
            dense = old(c.float()).double()
            plain = (old(c.float() * keep.float()).double() - dense).pow(2).sum()
            comp = (new(c.float() * keep.float()).double() - dense).pow(2).sum()
        entry = report["layers"][site.layer]
        assert comp < 0.9 * plain
        assert entry["rel_err_removed"] / entry["rel_err_compensated"] == pytest.approx(float(plain / comp), rel=1e-2)


def test_joint_scores_price_the_neurons_on_their_elimination_path():
    """With heads scored too, a neuron's error term is its step on its layer's elimination path (linalg), not its
    leave-one-out error: the path starts at the neuron leave-one-out finds cheapest, and the steps add up to more."""
    from anatomy_prune.linalg import elimination_path
    from anatomy_prune.scores.calibrated import joint_scores, removal_error
    from anatomy_prune.scores.calibration import ffn_input_stats

    loaded, cal, heads = head_calibration("tiny-llama")
    ffn = ffn_input_stats(cal, progress=False)
    loo = removal_error(loaded.model, ffn)
    path = removal_error(loaded.model, ffn, path=True)
    for site, g, a, b in zip(ffn_sites(loaded.model), ffn.gram, loo, path):
        order, steps = elimination_path(g, weight_out_in(get_module(base_model(loaded.model), site.down)), False)
        torch.testing.assert_close(b, steps.float())
        assert float(a[order[0]]) <= float(a.min()) * (1 + 1e-3)     # the path starts where leave-one-out is least
        assert float(b.sum()) > 1.5 * float(a.sum())
    n_loo, _ = joint_scores(ffn, heads, loaded.model, neuron_path=False)
    n_path, _ = joint_scores(ffn, heads, loaded.model, neuron_path=True)
    assert not all(torch.allclose(x, y) for x, y in zip(n_loo, n_path))
