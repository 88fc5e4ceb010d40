import json

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.anatomy.redundancy import cosine_similar, measure, redundancy_of, summary
from anatomy_prune.cli import main
from anatomy_prune.models.families import base_model, ffn_widths
from anatomy_prune.plan import plan_from_scores
from anatomy_prune.plotting.redundancy import plot_methods, plot_per_layer


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def lm_batches(n_batches=2, size=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 5000, (size, length), generator=g)} for _ in range(n_batches)]


def test_uniqueness_on_constructed_activations():
    a, b = torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    # columns: a, b, 3a (cos 1 with a), a + 0.1b (cos ~0.99 with a and 3a), -a (cos -1: signed, not similar)
    H = torch.stack([a, b, 3 * a, a + 0.1 * b, -a], dim=1)  # [tokens, m]
    flags, best = cosine_similar(H.t() @ H, (H * H).sum(0))
    assert flags.tolist() == [True, False, True, False, False]  # only the lower index of a close pair counts
    assert best[0] == pytest.approx(1.0, abs=1e-5) and best[3] == pytest.approx(-1 / 1.0 * 0.99, abs=0.02)
    flags_hi, _ = cosine_similar(H.t() @ H, (H * H).sum(0), threshold=0.999)
    assert flags_hi.tolist() == [True, False, False, False, False]


def test_sensitivity_matches_a_hand_computation_on_tiny_gpt2():
    lm = load_model("tiny-gpt2", device="cpu")
    batches = lm_batches()
    res = measure(lm.model, batches, lm_loss, progress=False)
    # independent path: autograd.grad, GPT-2's Conv1D orientation handled by hand ([in, out] storage)
    expected = [torch.zeros(37) for _ in range(3)]
    for batch in batches:
        blocks = base_model(lm.model).h
        params = [p for blk in blocks for p in (blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, blk.mlp.c_proj.weight)]
        grads = torch.autograd.grad(lm_loss(lm.model.eval(), batch), params)
        for layer, blk in enumerate(blocks):
            g_fc, g_b, g_proj = grads[3 * layer:3 * layer + 3]
            term = ((blk.mlp.c_fc.weight * g_fc).sum(0) + blk.mlp.c_fc.bias * g_b
                    + (blk.mlp.c_proj.weight * g_proj).sum(1))
            expected[layer] += term.abs().detach()
    for layer in range(3):
        got = torch.tensor(res["per_neuron"]["sensitivity"][layer])
        torch.testing.assert_close(got, expected[layer] / 6, rtol=1e-4, atol=1e-8)
        assert res["layers"][layer]["sensitivity_sum"] == pytest.approx(float(got.sum()), rel=1e-5)
    assert res["n_sequences"] == 6 and res["sens_sum"] == pytest.approx(sum(float(e.sum()) for e in expected) / 6,
                                                                          rel=1e-4)
    assert all(p.requires_grad for p in lm.model.parameters())  # flags restored


def test_copied_neuron_is_similar_and_dead_neuron_has_no_sensitivity():
    lm = load_model("tiny-gpt2", device="cpu")
    mlp = base_model(lm.model).h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, 1] = mlp.c_fc.weight[:, 0]   # neuron 1 computes what neuron 0 computes
        mlp.c_fc.bias[1] = mlp.c_fc.bias[0]
        mlp.c_fc.weight[:, 5] = 0                       # neuron 5 is dead: input row, bias, output column zero
        mlp.c_fc.bias[5] = 0
        mlp.c_proj.weight[5] = 0
    res = measure(lm.model, lm_batches(), lm_loss, progress=False)
    assert res["per_neuron"]["similar"][0][0] == 1 and res["per_neuron"]["max_cos_upper"][0][0] == pytest.approx(1, abs=1e-4)
    assert res["per_neuron"]["sensitivity"][0][5] == 0.0
    assert res["layers"][0]["similar"] >= 1
    assert res["unique"] == pytest.approx(1 - sum(lay["similar"] for lay in res["layers"]) / 111)


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_measure_on_a_pruned_model_with_an_emptied_layer(alias):
    from anatomy_prune.apply import physical
    lm = load_model(alias, device="cpu")
    plan = plan_from_scores([torch.arange(37.0)] * 3, 0.5)
    plan = plan.with_info(keep=[plan.keep[0], [], plan.keep[2]])
    physical(lm.model, plan)
    res = measure(lm.model, lm_batches(1), lm_loss, progress=False)
    assert [lay["width"] for lay in res["layers"]] == [19, 0, 19]
    assert res["layers"][1]["sensitivity_sum"] == 0.0 and res["layers"][1]["unique_fraction"] is None
    assert res["neurons"] == 38 and res["layers"][0]["sensitivity_sum"] > 0


def test_padding_is_left_out_of_uniqueness():
    lm = load_model("tiny-bert", device="cpu")
    ids = torch.randint(1000, 5000, (2, 8))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded = {"input_ids": padded_ids, "attention_mask": torch.cat([torch.ones(2, 8), torch.zeros(2, 4)], 1).long()}

    def loss(model, batch):
        return model(**batch).last_hidden_state[:, 0].pow(2).mean()
    a = measure(lm.model, [full], loss, progress=False)
    b = measure(lm.model, [padded], loss, progress=False)
    assert a["n_tokens"] == b["n_tokens"] == 16
    for la, lb in zip(a["per_neuron"]["max_cos_upper"], b["per_neuron"]["max_cos_upper"]):
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)


def test_redundancy_cli_on_a_plan_and_figures(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"review {i}: a fine film with a dull end, I liked the music" for i in range(30)))
    lm = load_model("tiny-gpt2", device="cpu")
    g = torch.Generator().manual_seed(0)
    plan = plan_from_scores([torch.rand(w, generator=g) for w in ffn_widths(lm.model)], 0.6)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "red"
    rc = main(["redundancy", "--model", "tiny-gpt2", "--plan", str(tmp_path / "plan.json"), "--text", str(text),
               "--max-length", "16", "--batch-size", "2", "--analysis-size", "4", "--eval-size", "4", "--out", str(out)])
    assert rc == 0
    red = json.loads((out / "redundancy.json").read_text())
    assert [lay["width"] for lay in red["layers"]] == plan.kept_widths and red["n_sequences"] == 4
    assert (out / "figures" / "redundancy_per_layer.png").is_file()
    assert {p.name for p in out.iterdir() if not p.name.startswith(".anatomy-prune")} == {"redundancy.json",
                                                                                          "figures"}
    rows = [{"label": m, "metric": "perplexity", "perplexity": p, "dense_perplexity": 20.0, "target_sparsity": 0.5,
             "redundancy": summary(red), "kept_widths": plan.kept_widths} for m, p in (("random", 30.0), ("gum", 25.0))]
    assert plot_methods(rows, tmp_path / "figs").is_file()
    assert plot_per_layer({r["label"]: r for r in rows}, tmp_path / "figs").is_file()


def test_redundancy_of_a_task_is_measure_on_its_analysis_batches(text_file):
    from anatomy_prune.train.tasks import LMTask
    lm = load_model("tiny-gpt2", device="cpu")
    texts = text_file.read_text().splitlines()
    task = LMTask(lm, texts, batch_size=2, max_length=16, steps=3, seed=0)
    got = redundancy_of(lm.model, task, 5, progress=False)
    expected = measure(lm.model, task.analysis_batches(5), task.loss, progress=False)
    assert got["n_sequences"] == expected["n_sequences"] == 5
    assert got["per_neuron"]["sensitivity"] == expected["per_neuron"]["sensitivity"]
    assert summary(got)["layers"] == got["layers"] and "per_neuron" not in summary(got)
    with pytest.raises(UserError, match="analysis-size"):
        redundancy_of(lm.model, task, 0)


def test_redundancy_job_refuses_a_plan_that_does_not_fit(tmp_path, text_file, capsys):
    from anatomy_prune.plan import PruningPlan
    PruningPlan(keep=[[0]] * 2, widths=[37, 37]).save(tmp_path / "wrong.json")
    out = tmp_path / "red"
    rc = main(["redundancy", "--model", "tiny-gpt2", "--plan", str(tmp_path / "wrong.json"), "--text",
               str(text_file), "--max-length", "16", "--analysis-size", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not fit" in err and len(err.splitlines()) == 1
    assert not out.exists()
