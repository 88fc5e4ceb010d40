"""Perplexity with per-text losses: the texts' losses add up to the reported perplexity, its bootstrap
interval (texts resampled, token-weighted) brackets it, a paired comparison of a model with itself finds
nothing and one with a damaged copy finds the damage; `anatomy-prune evaluate` reports a causal LM's
perplexity with its interval."""
import json
import math

import pytest
import torch

from anatomy_prune.errors import UserError
from anatomy_prune.evaluate.metrics import paired_perplexity, perplexity, perplexity_interval
from anatomy_prune.models.loading import load_model



@pytest.fixture
def lm():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture
def texts(text_file):
    return text_file.read_text().splitlines()[:12]


def test_per_text_losses_add_up_to_the_perplexity(lm, texts):
    r = perplexity(lm, texts, max_length=16, batch_size=4, progress=False)
    assert len(r["text_nll"]) == len(r["text_tokens"]) <= len(texts)
    assert sum(r["text_tokens"]) == r["n_tokens"]
    assert sum(r["text_nll"]) / sum(r["text_tokens"]) == pytest.approx(r["nll"], rel=1e-6)
    lo, hi = r["perplexity_interval"]
    assert lo < r["perplexity"] < hi


def test_interval_narrows_with_more_texts_and_collapses_without_spread():
    rng = torch.Generator().manual_seed(0)
    losses = (torch.rand(400, generator=rng) * 4).tolist()
    tokens = [10] * 400
    nll = [l * t for l, t in zip(losses, tokens)]
    few = perplexity_interval(nll[:20], tokens[:20])
    many = perplexity_interval(nll, tokens)
    assert math.log(many[1] / many[0]) < math.log(few[1] / few[0]) / 2
    flat = perplexity_interval([20.0] * 30, [10] * 30)   # every text at loss 2.0 per token
    assert flat == pytest.approx((math.exp(2.0), math.exp(2.0)))


def test_interval_weighs_texts_by_tokens():
    # 50 long texts at loss 1 per token and 50 one-token texts at loss 5: token-weighted, the perplexity is
    # about e^1.04; a mean over texts would give e^3
    lo, hi = perplexity_interval([100.0] * 50 + [5.0] * 50, [100] * 50 + [1] * 50)
    assert math.exp(1.0) < lo < hi < math.exp(1.2)


def test_paired_comparison_of_a_model_with_itself_and_with_a_damaged_copy(lm, texts):
    a = perplexity(lm, texts, max_length=16, batch_size=4, progress=False)
    same = paired_perplexity(a, perplexity(lm, texts, max_length=16, batch_size=4, progress=False))
    assert same["ratio"] == pytest.approx(1.0) and same["p_value"] == 1.0
    with torch.no_grad():
        for p in lm.model.model.layers[0].mlp.down_proj.parameters():
            p.mul_(40.0)
    b = perplexity(lm, texts, max_length=16, batch_size=4, progress=False)
    test = paired_perplexity(b, a)
    assert test["ratio"] == pytest.approx(b["perplexity"] / a["perplexity"], rel=1e-6)
    assert test["low"] <= test["ratio"] <= test["high"]
    assert test["ratio"] > 1 and test["low"] > 1 and test["p_value"] < 0.05


def test_paired_comparison_refuses_different_texts(lm, texts):
    a = perplexity(lm, texts, max_length=16, batch_size=4, progress=False)
    b = perplexity(lm, texts[:6], max_length=16, batch_size=4, progress=False)
    with pytest.raises(UserError, match="same texts"):
        paired_perplexity(a, b)


def test_cli_evaluate_gives_a_language_models_perplexity_with_its_interval(tmp_path, tiny_csv, capsys):
    from anatomy_prune.cli import main

    js = tmp_path / "m.json"
    assert main(["evaluate", "--model", "tiny-llama", "--data", str(tiny_csv), "--eval-size", "12",
                 "--max-length", "16", "--json", str(js)]) == 0
    printed = json.loads(capsys.readouterr().out)
    lo, hi = printed["perplexity_interval"]
    assert lo < printed["perplexity"] < hi and "text_nll" not in printed
    assert len(json.loads(js.read_text())["text_nll"]) > 1
