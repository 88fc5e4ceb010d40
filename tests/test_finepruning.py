import json

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.cli import main
from anatomy_prune.evaluate import evaluate_classifier, perplexity
from anatomy_prune.finepruning.masks import (NeuronMasks, RunningSimilarity, abs_cosine, gum_regulariser, top_masks,
                                             uniqueness_weights)
from anatomy_prune.finepruning.schedule import CubicSchedule
from anatomy_prune.finepruning.train import (FinepruneConfig, as_task_model, finepruning, lm_text_split, make_task,
                                             plan_of)
from anatomy_prune.hooks import run_with_hooks
from anatomy_prune.models.families import base_model, ffn_sites, ffn_widths, get_module
from anatomy_prune.scores.basic import magnitude_scores

# text_file: the conftest fixture (forty lines of seeded word salad)


def keep_count(width: int, keep: float) -> int:
    """Neurons kept out of `width` at keep fraction `keep` (the allocator's rounding), by hand."""
    return width - int(round((1.0 - keep) * width))


# --- schedule --------------------------------------------------------------------------------------

def test_schedule_dense_cubic_final_and_monotone():
    s = CubicSchedule(total=100, keep_final=0.5, warmup=0.1)
    assert (s.t_initial, s.t_final) == (10, 30)
    assert all(s.keep(t) == 1.0 for t in range(0, 11))               # dense warm-up, t <= t_i
    assert all(s.keep(t) == 0.5 for t in range(70, 100))             # final stretch (c = 0 at T - t_f)
    assert s.keep(40) == pytest.approx(0.5 + 0.5 * 0.5 ** 3)          # c = 1 - 30/60
    assert s.keep(25) == pytest.approx(0.5 + 0.5 * 0.75 ** 3)
    values = [s.keep(t) for t in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert s.lr_factor(0) == pytest.approx(0.1) and s.lr_factor(9) == pytest.approx(1.0)
    assert s.lr_factor(99) == pytest.approx(1 / 90)


def test_schedule_refuses_too_few_steps():
    assert CubicSchedule.min_steps(0.1) == 10
    CubicSchedule(10, 0.5).validate()
    with pytest.raises(UserError, match="at least 10 steps"):
        CubicSchedule(9, 0.5).validate()
    with pytest.raises(UserError, match="warmup"):
        CubicSchedule(100, 0.5, warmup=0.3).validate()


# --- masks -----------------------------------------------------------------------------------------

def test_local_and_global_masks_keep_exact_counts():
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(37, generator=g), torch.rand(37, generator=g) + 10, torch.rand(20, generator=g) - 10]
    for keep in (1.0, 0.83, 0.5, 0.1):
        local = top_masks(scores, keep, "local")
        assert [int(m.sum()) for m in local] == [keep_count(37, keep), keep_count(37, keep), keep_count(20, keep)]
        for m, s in zip(local, scores):  # the kept ones are the best of their layer
            assert s[m > 0].min() >= s[m == 0].max() if 0 < m.sum() < m.numel() else True
        glob = top_masks(scores, keep, "global")
        assert sum(int(m.sum()) for m in glob) == keep_count(94, keep)
    glob = top_masks(scores, 0.4, "global")
    assert int(glob[1].sum()) == 37 and int(glob[2].sum()) == 0  # global: no per-layer floor


def test_random_masks_are_nested_over_the_schedule():
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(w, generator=g) for w in (37, 37, 37)]
    sched = CubicSchedule(60, 0.3)
    for selection in ("local", "global"):
        prev = None
        for t in range(60):
            masks = top_masks(scores, sched.keep(t), selection)
            if prev is not None:
                assert all(bool((m <= p).all()) for m, p in zip(masks, prev))  # never regrows
            prev = masks
        assert sum(int(m.sum()) for m in prev) == keep_count(111, 0.3) if selection == "global" else True


def _ste_pass(loaded, masks, c):
    """One forward through the model with the masks installed; the loss is c . (layer 0's down-projection
    output), so dL/dh' = W^T c there. Returns (h before the mask, h' after it, y) of layer 0."""
    base = base_model(loaded.model)
    down = get_module(base, ffn_sites(loaded.model)[0].down)
    seen = {}
    # an outer run_with_hooks observes what the inner (the masks) then edits
    with run_with_hooks(loaded.model, {"ffn.0.hidden": lambda x, p: seen.setdefault("h", x.detach().clone())}), \
            masks.installed():
        handle = down.register_forward_hook(lambda m, a, y: seen.update(masked=a[0].detach().clone(), y=y))
        try:
            base(input_ids=torch.tensor([[101, 2023, 2003, 1037, 2204, 2143, 102]] * 2))
        finally:
            handle.remove()
    (seen["y"] * c).sum().backward()
    return seen["h"], seen["masked"], seen["y"], down


def test_ste_gives_the_hand_formula_on_a_tiny_layer():
    loaded = load_model("tiny-bert", device="cpu")
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    c = torch.randn(32, generator=torch.Generator().manual_seed(0))
    masks = NeuronMasks(loaded.model, ffn_widths(loaded.model), torch.device("cpu"), learnable=True)
    hard = torch.ones(37)
    hard[[1, 4, 20]] = 0.0
    masks.set([hard, torch.ones(37), torch.ones(37)])
    h, masked, y, down = _ste_pass(loaded, masks, c)
    torch.testing.assert_close(masked, h * hard)                  # forward: the hard mask
    torch.testing.assert_close(y, down(h * hard))
    # dL/ds_i = sum_tokens h_i * dL/dh'_i with dL/dh' = W^T c, for kept and pruned neurons alike
    expected = (h * (down.weight.t() @ c)).sum(dim=(0, 1))
    torch.testing.assert_close(masks.scores[0].grad, expected, rtol=1e-4, atol=1e-5)
    assert masks.scores[0].grad[1].abs() > 0         # a pruned neuron still gets its first-order gradient
    assert masks.scores[1].grad is None or masks.scores[1].grad.abs().max() == 0  # the loss never reaches them
    # with every neuron kept, the score gradient is sum_j W2_ji dL/dW2_ji (the movement formula, -(-W dL/dW))
    loaded.model.zero_grad(set_to_none=True)
    masks.scores[0].grad = None
    masks.set([torch.ones(37)] * 3)
    _ste_pass(loaded, masks, c)
    torch.testing.assert_close(masks.scores[0].grad, (down.weight * down.weight.grad).sum(dim=0),
                               rtol=1e-4, atol=1e-5)
    # the hooks are gone after the block: the model computes the dense output again
    with torch.no_grad():
        x = torch.tensor([[101, 2023, 102]])
        masks.set([torch.zeros(37)] * 3)
        dense = base_model(loaded.model)(input_ids=x).last_hidden_state
        with masks.installed():
            cut = base_model(loaded.model)(input_ids=x).last_hidden_state
        torch.testing.assert_close(base_model(loaded.model)(input_ids=x).last_hidden_state, dense)
    assert not torch.allclose(cut, dense)


def test_magnitude_masks_come_from_the_one_magnitude_score():
    """Fine-pruning's magnitude method ranks neurons by scores.basic.magnitude_scores: zeroing a neuron's
    output column drops it to the bottom, and the local mask removes it first."""
    loaded = load_model("tiny-gpt2", device="cpu")
    mlp = base_model(loaded.model).h[1].mlp
    with torch.no_grad():
        mlp.c_proj.weight[7] = 0.0                  # Conv1D [d_ff, d]: row 7 is neuron 7's output vector
    scores = magnitude_scores(loaded.model)
    assert scores[1][7] == 0 and (scores[0] > 0).all()
    masks = top_masks(scores, 1 - 1 / 37, "local")  # one neuron per layer removed
    assert masks[1][7] == 0 and int(masks[1].sum()) == 36


def test_gum_uniqueness_weights_on_a_constructed_activation_matrix():
    a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    # columns: a, 2a (cos 1), b (orthogonal), -b (cos -1), a+b (cos 1/sqrt 2 with all four), pruned (zero)
    H = torch.stack([a, 2 * a, b, -b, a + b, torch.zeros(4)], dim=1)  # [tokens, m=6]
    sim = RunningSimilarity([6], rho=0.999, device="cpu")
    sim.update(0, H)
    torch.testing.assert_close(sim.gram[0], 0.999 * H.t() @ H)
    r = 2 ** -0.5
    # u_i = sum_j |C_ij| / (m v), m v = 6 * 5/6 = 5 kept neurons
    u = torch.tensor([1 + r, 1 + r, 1 + r, 1 + r, 4 * r, 0.0]) / 5
    w = uniqueness_weights(sim.gram[0], sim.sq[0], keep=5 / 6, lambda_u=2.0)
    torch.testing.assert_close(w, 1 + 2.0 * u, atol=1e-5, rtol=1e-5)
    H2 = torch.randn(4, 6)
    sim.update(0, H2)
    torch.testing.assert_close(sim.gram[0], 0.001 * 0.999 * H.t() @ H + 0.999 * H2.t() @ H2)
    torch.testing.assert_close(sim.sq[0], 0.001 * 0.999 * (H * H).sum(0) + 0.999 * (H2 * H2).sum(0))


def test_abs_cosine_by_hand():
    h = torch.tensor([[1.0, 2.0, -1.0], [0.0, 2.0, 0.0]])  # [tokens, m]: columns (1,0), (2,2), (-1,0)
    c = abs_cosine(h.t() @ h, (h * h).sum(0), eps=0.0)
    r = 2 ** -0.5
    torch.testing.assert_close(c, torch.tensor([[0.0, r, 1.0], [r, 0.0, r], [1.0, r, 0.0]]))


def test_gum_regulariser_matches_the_formula():
    s = [torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 0.5])]
    w = [torch.tensor([1.0, 2.0, 1.5]), torch.tensor([1.0, 1.0])]
    sig = torch.sigmoid
    expected = ((sig(s[0]) * w[0]).sum() / 3 + (sig(s[1]) * w[1]).sum() / 2) / (3 * 2)
    torch.testing.assert_close(gum_regulariser(s, w), expected)


def test_task_model_task_and_plan_helpers(text_file):
    lm = load_model("tiny-gpt2", device="cpu")
    assert as_task_model(lm, "lm", 0) is lm
    cfg = FinepruneConfig(model="tiny-gpt2", method="magnitude", sparsity=0.5, steps=10, text=str(text_file),
                          max_length=16, batch_size=2, eval_size=6)
    task, held_out = make_task(lm, cfg)
    train, expected_held_out = lm_text_split(str(text_file), cfg.train_size, 6, cfg.seed)
    assert held_out.texts == expected_held_out and set(held_out.labels) == {-1} and task.max_length == 16
    assert task.batch(0)["input_ids"].shape == (2, 16) and not set(held_out.texts) & set(train)
    masks = NeuronMasks(lm.model, ffn_widths(lm.model), torch.device("cpu"))
    masks.set(top_masks(magnitude_scores(lm.model), 0.5, "local"))
    plan = plan_of(lm, masks, cfg)
    assert plan.method == "finepruning-magnitude" and plan.kept_widths == [19, 19, 19]
    assert plan.params["selection"] == "local" and plan.seed == 0 and list(plan.widths) == [37] * 3
    backbone = load_model("tiny-bert", device="cpu")
    clf = as_task_model(backbone, "imdb", 0)
    assert clf.kind == "classifier" and clf.model.backbone is backbone.model
    with pytest.raises(UserError, match="causal language model"):
        make_task(clf, cfg)


# --- end to end ------------------------------------------------------------------------------------

LM_ARGS = ["--max-length", "16", "--batch-size", "2", "--eval-size", "6", "--analysis-size", "4", "--seed", "1"]


def test_finepruning_lm_end_to_end_reloads(tmp_path, text_file):
    out = tmp_path / "run"
    rc = main(["finepruning", "--model", "tiny-gpt2", "--method", "movement", "--sparsity", "0.5", "--steps", "12",
               "--text", str(text_file), "--out", str(out), *LM_ARGS])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert res["method"] == "movement" and plan["method"] == "finepruning-movement"
    assert res["kept_widths"] == [19, 19, 19] and plan["summary"]["neurons_removed"] == 3 * 18
    assert len(res["redundancy"]["layers"]) == 3 and res["redundancy"]["layers"][0]["width"] == 19
    assert res["history"]["keep"][0] == 1.0 and res["history"]["keep"][-1] == 0.5
    assert res["physical_vs_masked_max_abs_diff"] < 1e-4
    assert (out / "figures" / "training.png").is_file() and (out / "figures" / "redundancy_per_layer.png").is_file()
    again = load_model(str(out), device="cpu")
    assert ffn_widths(again.model) == [19, 19, 19]
    _, held_out = lm_text_split(str(text_file), 2000, 6, 1)
    ppl = perplexity(again, held_out, max_length=16, batch_size=2, progress=False)["perplexity"]
    assert ppl == pytest.approx(res["perplexity"], rel=1e-5)  # the saved model is the masked model at the end


def test_finepruning_imdb_gum_on_tiny_bert(tmp_path, tiny_csv):
    out = tmp_path / "run"
    rc = main(["finepruning", "--model", "tiny-bert", "--task", "imdb", "--data", str(tiny_csv), "--method", "gum",
               "--sparsity", "0.4", "--steps", "10", "--train-size", "16", "--eval-size", "8", "--batch-size", "4",
               "--max-length", "24", "--analysis-size", "8", "--lambda-u", "5", "--no-figures", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["selection"] == "global" and res["metric"] == "accuracy"
    assert sum(res["kept_widths"]) == 111 - 44  # exactly the global count: 111 - round(0.4 * 111)
    again = load_model(str(out), device="cpu")
    assert again.kind == "classifier"
    from anatomy_prune.data import load_splits
    test = load_splits(str(tiny_csv), (16, 0, 8), 0).test
    acc = evaluate_classifier(again, test, batch_size=16, max_length=24, progress=False)["accuracy"]
    assert acc == pytest.approx(res["accuracy"])


def test_finepruned_folder_gives_the_masked_outputs(tmp_path, text_file):
    cfg = FinepruneConfig(model="tiny-llama", method="magnitude", sparsity=0.3, steps=10, text=str(text_file),
                          max_length=16, batch_size=2, eval_size=6, analysis_size=4, eval_dense=False)
    r = finepruning(cfg, tmp_path / "run", progress=False, figures=False)
    again = load_model(str(tmp_path / "run"), device="cpu")
    with torch.no_grad():
        got = again.model(input_ids=r.probe["input_ids"]).logits
    torch.testing.assert_close(got, r.probe_outputs, rtol=1e-5, atol=1e-5)
    assert again.info["plan"]["keep"] == r.plan.to_dict()["keep"]
    assert r.plan.kept_widths == [26, 26, 26]  # 37 - round(0.3 * 37), every layer alike (local)


def test_random_method_is_seeded_and_keeps_the_top_random_scores(tmp_path, text_file):
    kw = dict(model="tiny-gpt2", method="random", sparsity=0.5, steps=10, text=str(text_file), max_length=16,
              batch_size=2, eval_size=6, analysis_size=2, eval_dense=False, seed=7)
    r = finepruning(FinepruneConfig(**kw), tmp_path / "a", progress=False, figures=False)
    g = torch.Generator().manual_seed(7)
    expected = top_masks([torch.rand(37, generator=g) for _ in range(3)], 0.5, "local")
    assert r.plan.to_dict()["keep"] == [torch.nonzero(m).flatten().tolist() for m in expected]


# --- bad input: one line, nothing written -----------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0", "--steps", "20"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1", "--steps", "20"], "sparsity must be in [0, 1)"),
    (["--sparsity", "0.5", "--steps", "5"], "below the pruning schedule's warm-up"),
])
def test_bad_numbers_are_one_line_errors(tmp_path, text_file, capsys, extra, message):
    out = tmp_path / "run"
    rc = main(["finepruning", "--model", "tiny-gpt2", "--method", "random", "--text", str(text_file),
               "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_empty_text_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "run"
    rc = main(["finepruning", "--model", "tiny-gpt2", "--method", "gum", "--sparsity", "0.5", "--steps", "10",
               "--text", str(empty), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has no text" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_lm_task_needs_a_decoder(tmp_path, text_file):
    with pytest.raises(UserError, match="causal language model"):
        finepruning(FinepruneConfig(model="tiny-bert", method="random", steps=10, text=str(text_file)),
                    tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- real models (slow: run with -m slow) ------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_lm_finepruning_runs_and_reloads(tmp_path):
    cfg = FinepruneConfig(model="smollm2", method="gum", sparsity=0.5, steps=10, task="lm", batch_size=1,
                          max_length=32, train_size=50, eval_size=4, analysis_size=2, eval_dense=False)
    r = finepruning(cfg, tmp_path / "run", progress=False, figures=False)
    assert sum(r.plan.kept_widths) == 30 * 1536 // 2 and r.results["physical_vs_masked_max_abs_diff"] < 1e-3
    again = load_model(str(tmp_path / "run"), device="cpu")
    with torch.no_grad():
        got = again.model(input_ids=r.probe["input_ids"]).logits
    torch.testing.assert_close(got, r.probe_outputs, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_minilm_imdb_finepruning_runs(tmp_path):
    cfg = FinepruneConfig(model="minilm", method="movement", sparsity=0.5, steps=10, task="imdb", batch_size=4,
                          max_length=64, train_size=100, eval_size=16, analysis_size=4, eval_dense=False)
    r = finepruning(cfg, tmp_path / "run", progress=False, figures=False)
    assert r.plan.kept_widths == [768] * 6 and 0 <= r.results["accuracy"] <= 1
    assert len(r.results["redundancy"]["layers"]) == 6


def _train_top_block(alias: str, tiny_csv):
    """A tiny classifier fine-tuned with train_layers=1: (model, names of the parameters that moved, config)."""
    from anatomy_prune.data.splits import load_splits
    from anatomy_prune.models.classifier import BinaryClassifier
    from anatomy_prune.models.loading import Loaded
    from anatomy_prune.train.finetune import FinetuneConfig, train_classifier

    base = load_model(alias, device="cpu")
    torch.manual_seed(0)
    model = BinaryClassifier(base.model)
    loaded = Loaded(model=model, tokenizer=base.tokenizer, kind="classifier", spec="x", info={}, dtype=base.dtype)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = FinetuneConfig(model=alias, data=str(tiny_csv), train_size=16, val_size=0, test_size=4,
                         max_length=16, batch_size=8, lr=1e-2, train_layers=1)
    train_classifier(loaded, load_splits(str(tiny_csv), (16, 0, 4), 0).train, cfg, progress=False)
    return model, {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}, cfg


def test_finetune_of_the_top_blocks_only_moves_them_and_the_head(tiny_csv):
    """train_layers=N (the offline GPT-2 recipe's CPU saving) trains the top N blocks, the final norm and the
    head; every lower block and the embeddings stay as they were, and requires_grad is restored after."""
    from anatomy_prune.train.finetune import FinetuneConfig

    model, moved, cfg = _train_top_block("tiny-gpt2", tiny_csv)
    last = len(model.backbone.h) - 1
    assert moved and all(k.startswith((f"backbone.h.{last}.", "backbone.ln_f.", "dense.")) for k in moved)
    assert any(k.startswith(f"backbone.h.{last}.") for k in moved) and "dense.weight" in moved
    assert all(p.requires_grad for p in model.parameters())
    # the digest of a recipe without train_layers is what it was before the field existed (run folders reused)
    assert "train_layers" not in FinetuneConfig().settings() and cfg.settings()["train_layers"] == 1
    with pytest.raises(UserError, match="train_layers"):
        FinetuneConfig(train_layers=-1).validate()


def test_top_blocks_only_freezes_mpnets_shared_position_bias(tiny_csv):
    """MPNet adds one relative-position bias table to every block's attention: it must be frozen with the lower
    blocks, or the backward pass runs through all of them (the mpnet-base preset trains the top 6 of 12)."""
    from anatomy_prune.train.finetune import preset

    model, moved, _cfg = _train_top_block("tiny-mpnet", tiny_csv)
    last = len(model.backbone.encoder.layer) - 1
    assert "dense.weight" in moved and any(k.startswith(f"backbone.encoder.layer.{last}.") for k in moved)
    assert all(k.startswith((f"backbone.encoder.layer.{last}.", "backbone.pooler.", "dense.")) for k in moved), moved
    assert all(p.requires_grad for p in model.parameters())
    rec = preset("mpnet-base")
    rec.validate()
    assert (rec.model, rec.train_layers, rec.train_size) == ("mpnet-base", 6, 2000)
