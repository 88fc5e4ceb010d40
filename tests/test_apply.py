import dataclasses
import subprocess
import sys

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.apply import MODES, apply_plan, mask, masked, physical
from anatomy_prune.evaluate import count_params, flops_per_token
from anatomy_prune.models.families import ffn_widths
from anatomy_prune.models.saved import save_model
from anatomy_prune.plan import PruningPlan, plan_from_scores


def random_plan(model, sparsity=0.5, seed=0, empty_layer=None) -> PruningPlan:
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(w, generator=g) for w in ffn_widths(model)]
    plan = plan_from_scores(scores, sparsity, method="test", seed=seed)
    if empty_layer is not None:  # plans are immutable: a copy with one layer emptied
        plan = plan.with_info(keep=[[] if i == empty_layer else k for i, k in enumerate(plan.keep)])
    return plan


def logits(loaded, batch):
    with torch.no_grad():
        return loaded.model(**batch)


def test_physical_matches_mask_and_masked(tiny_classifier, batch):
    plan = random_plan(tiny_classifier.model, 0.5, empty_layer=1)
    dense = logits(tiny_classifier, batch)
    with masked(tiny_classifier.model, plan):
        expected = logits(tiny_classifier, batch)
    assert torch.equal(logits(tiny_classifier, batch), dense)  # hooks removed
    assert not torch.allclose(expected, dense)
    zeroed = mask(__import__("copy").deepcopy(tiny_classifier.model), plan)
    with torch.no_grad():
        torch.testing.assert_close(zeroed(**batch), expected)
    before = count_params(tiny_classifier.model)
    physical(tiny_classifier.model, plan)
    torch.testing.assert_close(logits(tiny_classifier, batch), expected, rtol=1e-5, atol=1e-6)
    assert ffn_widths(tiny_classifier.model) == plan.kept_widths and plan.kept_widths[1] == 0
    assert count_params(tiny_classifier.model) < before


def test_causal_lm_physical_matches_mask(tiny):
    enc = tiny.tokenizer(["a short text to score", "another"], return_tensors="pt", padding=True)
    plan = random_plan(tiny.model, 0.7)
    with torch.no_grad(), masked(tiny.model, plan):
        expected = tiny.model(**enc).logits if tiny.kind == "causal-lm" else tiny.model(**enc).last_hidden_state
    physical(tiny.model, plan)
    with torch.no_grad():
        got = tiny.model(**enc).logits if tiny.kind == "causal-lm" else tiny.model(**enc).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_flops_fall_with_pruning(tiny):
    before = flops_per_token(tiny.model)
    physical(tiny.model, random_plan(tiny.model, 0.5))
    assert flops_per_token(tiny.model) < before


def test_plan_that_does_not_fit_is_refused(tiny):
    wrong = PruningPlan(keep=[[0]] * 2, widths=[37, 37])
    with pytest.raises(UserError, match="does not fit"):
        physical(tiny.model, wrong)


def test_plan_json_roundtrip(tmp_path, tiny):
    plan = random_plan(tiny.model, 0.3, seed=4)
    plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(tmp_path / "plan.json")
    assert again.keep == plan.keep and again.seed == 4 and abs(again.sparsity - plan.sparsity) < 1e-9
    (tmp_path / "bad.json").write_text("{\"keep\": 1}")
    with pytest.raises(UserError):
        PruningPlan.load(tmp_path / "bad.json")


def test_plan_rejects_out_of_range_ids():
    with pytest.raises(UserError, match="distinct"):
        PruningPlan(keep=[[0, 40]], widths=[37])


def test_save_reload_in_fresh_process(tmp_path, tiny_classifier, batch):
    plan = random_plan(tiny_classifier.model, 0.4, empty_layer=0)
    physical(tiny_classifier.model, plan)
    expected = logits(tiny_classifier, batch)
    save_model(tiny_classifier, tmp_path / "m", plan=plan.to_dict())
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    code = (
        "import torch; from anatomy_prune import load_model; "
        f"d = torch.load(r'{tmp_path / 'io.pt'}'); m = load_model(r'{tmp_path / 'm'}', device='cpu'); "
        "torch.testing.assert_close(m.model(**d['batch']), d['expected'], rtol=1e-5, atol=1e-6); "
        "assert m.info['plan']['keep'] == " + repr(plan.to_dict()["keep"]) + "; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


def test_uniform_width_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    lm = load_model("tiny-llama", device="cpu")
    scores = [torch.arange(w, dtype=torch.float) for w in ffn_widths(lm.model)]
    plan = plan_from_scores(scores, 0.5)
    assert len(set(plan.kept_widths)) == 1
    physical(lm.model, plan)
    save_model(lm, tmp_path / "lm", plan=plan.to_dict())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, lm.model(x).logits, rtol=1e-5, atol=1e-6)


def test_global_allocation_respects_floor_and_total():
    scores = [torch.rand(100) * 10, torch.rand(100) * 0.01, torch.rand(50)]
    plan = plan_from_scores(scores, 0.5, allocation={"kind": "global", "floor": 0.1})
    assert plan.neurons_removed == 125
    assert min(len(k) / w for k, w in zip(plan.keep, plan.widths)) >= 0.1
    assert plan.params["allocation"] == "global" and plan.params["floor"] == 0.1
    with pytest.raises(UserError, match="floor"):
        plan_from_scores(scores, 0.95, allocation={"kind": "global", "floor": 0.1})
    with pytest.raises(UserError, match="allocation"):
        plan_from_scores(scores, 0.5, allocation={"kind": "everywhere"})


def test_sparsity_out_of_range():
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        plan_from_scores([torch.rand(10)], 1.0)


def test_plan_is_validated_strictly():
    with pytest.raises(UserError, match="whole numbers"):
        PruningPlan(keep=[[0, 1.0]], widths=[37])          # ids must be ints, not floats
    with pytest.raises(UserError, match="whole numbers"):
        PruningPlan(keep=[[True]], widths=[37])
    with pytest.raises(UserError, match="keeps no neuron"):
        PruningPlan(keep=[[], []], widths=[37, 37])         # a model needs some neurons
    with pytest.raises(UserError, match="widths"):
        PruningPlan(keep=[[0]], widths=[0])
    with pytest.raises(UserError, match="layers"):
        PruningPlan(keep=[[0]], widths=[37, 37])
    ok = PruningPlan(keep=[[3, 1], []], widths=[37, 37])  # one emptied layer is fine; ids are sorted
    assert ok.to_dict()["keep"] == [[1, 3], []] and ok.kept_widths == [2, 0]


def test_plan_is_frozen_and_with_info_copies():
    plan = PruningPlan(keep=[[0, 1], [2]], widths=[4, 4], method="a", params={"x": [1]}, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.keep = [[0], [0]]
    other = plan.with_info(method="b", seed=2, params={"x": [2]})
    assert (other.method, other.seed, other.params, other.keep) == ("b", 2, {"x": [2]}, plan.keep)
    assert (plan.method, plan.seed, plan.params) == ("a", 1, {"x": [1]})
    emptied = plan.with_info(keep=[[0, 1], []])
    assert emptied.kept_widths == [2, 0] and plan.kept_widths == [2, 1]
    with pytest.raises(UserError, match="distinct"):
        plan.with_info(keep=[[0, 9], [2]])                 # a copy is validated like a new plan
    params = {"y": [1]}
    held = PruningPlan(keep=[[0]], widths=[4], params=params)
    params["y"].append(2)                                 # the caller's dict is copied, not shared
    assert held.params == {"y": [1]}


def test_plan_keep_lists_cannot_be_edited_in_place():
    """Frozen all the way down (was .src_issues.md #1): the kept ids cannot be edited past validation."""
    plan = PruningPlan(keep=[[0, 1], [2]], widths=[4, 4])
    with pytest.raises((TypeError, AttributeError)):
        plan.keep[1].append(99)                           # would be out of range for width 4
    with pytest.raises((TypeError, AttributeError)):
        plan.keep[0][0] = 3
    assert plan.to_dict()["keep"] == [[0, 1], [2]]


def test_apply_plan_by_mode_name(tiny):
    plan = random_plan(tiny.model, 0.5)
    assert MODES == ("mask", "physical")
    apply_plan(tiny.model, plan, "mask")
    assert ffn_widths(tiny.model) == list(plan.widths)
    apply_plan(tiny.model, plan, "physical")
    assert ffn_widths(tiny.model) == plan.kept_widths
    with pytest.raises(UserError, match="mask, physical"):
        apply_plan(tiny.model, plan, "zero")


def test_surgery_primitives(tiny):
    """models.surgery: keep listed neurons, resize to widths, record widths in the config, and GPT-2's
    Conv1D with no neuron left still computes its bias."""
    from anatomy_prune.models.families import base_model, family_of, ffn_sites, get_module
    from anatomy_prune.models.surgery import SafeConv1D, keep_ffn_neurons, resize_ffn, set_config_widths
    import copy
    enc = tiny.tokenizer(["a short text"], return_tensors="pt")
    plan = PruningPlan(keep=[[0, 5, 36], [], list(range(37))], widths=[37] * 3)
    with torch.no_grad(), masked(tiny.model, plan):
        expected = tiny.model(**enc)[0]
    kept = keep_ffn_neurons(copy.deepcopy(tiny.model), plan.keep)
    assert ffn_widths(kept) == [3, 0, 37] and base_model(kept).config.anatomy_prune_ffn_widths == [3, 0, 37]
    with torch.no_grad():
        torch.testing.assert_close(kept(**enc)[0], expected, rtol=1e-5, atol=1e-6)
    if family_of(kept).name == "gpt2":
        down = get_module(base_model(kept), ffn_sites(kept)[1].down)
        assert isinstance(down, SafeConv1D) and down.weight.shape == (0, 32)
        torch.testing.assert_close(down(torch.zeros(2, 4, 0)), down.bias.expand(2, 4, 32))
    resized = resize_ffn(copy.deepcopy(tiny.model), [10, 10, 10])
    assert ffn_widths(resized) == [10, 10, 10]
    field = {"gpt2": "n_inner", "llama": "intermediate_size", "bert": "intermediate_size"}[tiny.family.name]
    assert getattr(base_model(resized).config, field) == 10       # uniform: the family's own field too
    set_config_widths(resized, [10, 9, 10])
    assert getattr(base_model(resized).config, field) == 10 and base_model(resized).config.anatomy_prune_ffn_widths \
        == [10, 9, 10]
    with pytest.raises(ValueError):
        resize_ffn(copy.deepcopy(tiny.model), [38, 37, 37])
    with pytest.raises(ValueError):
        keep_ffn_neurons(copy.deepcopy(tiny.model), [[0]] * 2)
