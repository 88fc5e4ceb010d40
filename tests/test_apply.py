import subprocess
import sys

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.apply import mask, masked, physical
from anatomy_prune.evaluate import count_params, flops_per_token
from anatomy_prune.families import ffn_widths
from anatomy_prune.io import save_model
from anatomy_prune.plan import PruningPlan, plan_from_scores


def random_plan(model, sparsity=0.5, seed=0, empty_layer=None) -> PruningPlan:
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(w, generator=g) for w in ffn_widths(model)]
    plan = plan_from_scores(scores, sparsity, method="test", seed=seed)
    if empty_layer is not None:
        plan.keep[empty_layer] = []
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
    save_model(tiny_classifier, tmp_path / "m", plan=plan)
    torch.save({"batch": batch, "expected": expected}, tmp_path / "io.pt")
    code = (
        "import torch; from anatomy_prune import load_model; "
        f"d = torch.load(r'{tmp_path / 'io.pt'}'); m = load_model(r'{tmp_path / 'm'}', device='cpu'); "
        "torch.testing.assert_close(m.model(**d['batch']), d['expected'], rtol=1e-5, atol=1e-6); "
        "assert m.info['plan']['keep'] == " + repr(plan.keep) + "; print('ok')"
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
    save_model(lm, tmp_path / "lm", plan=plan)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, lm.model(x).logits, rtol=1e-5, atol=1e-6)


def test_global_allocation_respects_floor_and_total():
    scores = [torch.rand(100) * 10, torch.rand(100) * 0.01, torch.rand(50)]
    plan = plan_from_scores(scores, 0.5, allocation="global", floor=0.1)
    assert plan.neurons_removed == 125
    assert min(len(k) / w for k, w in zip(plan.keep, plan.widths)) >= 0.1
    with pytest.raises(UserError, match="floor"):
        plan_from_scores(scores, 0.95, allocation="global", floor=0.1)


def test_sparsity_out_of_range():
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        plan_from_scores([torch.rand(10)], 1.0)
