"""benchmarks/peer_adapters.py: Torch-Pruning and TextPruner on our BinaryClassifier (tiny random BERT, and
tiny random MPNet: other names, and one relative position bias shared by every layer).

Skipped where the peers are not installed (they are not in requirements.txt): install them with
`pip install torch-pruning==1.6.1` and `pip install --no-deps textpruner==1.1.post2`.

Besides shapes and fields, each pruned model is checked against the dense one with the removed units
masked (FFN neurons zeroed in intermediate.dense, heads zeroed in the attention-output input columns):
the outputs must agree, so the adapter removed exactly what it reports and kept the rest intact.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXTS, make_classifier

ADAPTERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_adapters.py"


def _adapters():
    spec = importlib.util.spec_from_file_location("peer_adapters", ADAPTERS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loss_fn(model, batch):
    return F.binary_cross_entropy_with_logits(model(batch["input_ids"], batch["attention_mask"]),
                                              batch["labels"].float())


def _batches(tok, texts, labels, size):
    out = []
    for i in range(0, len(texts), size):
        enc = tok(texts[i:i + size], padding=True, truncation=True, max_length=32, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor(labels[i:i + size], dtype=torch.float32)})
    return out


@pytest.fixture
def torch_pruning():
    return pytest.importorskip("torch_pruning", exc_type=ImportError)


@pytest.fixture
def textpruner():
    return pytest.importorskip("textpruner", exc_type=ImportError)


@pytest.fixture(params=["tiny-bert", "tiny-mpnet"])
def setup(request):
    loaded = make_classifier(request.param)
    texts = TEXTS * 2
    calib = _batches(loaded.tokenizer, texts, [1, 0, 1, 0] * 2, 4)
    probe = _batches(loaded.tokenizer, ["A fine film.", "Nothing works here, not even the jokes or the music."],
                     [1, 0], 2)[0]
    return loaded.model, calib, probe


def _match_rows(orig, new, size=1):
    """Indices (in units of `size` rows) of orig's rows that new keeps, in new's order; each must match."""
    o = orig.reshape(-1, size * orig.shape[1])
    n = new.reshape(-1, size * new.shape[1])
    eq = (n[:, None, :] == o[None, :, :]).all(-1)
    assert bool(eq.any(1).all()), "a kept unit's weights changed"
    return eq.float().argmax(1).tolist()


def _masked_reference(pa, dense, pruned):
    """The dense model with every unit the pruned one lacks zeroed (its output contribution removed)."""
    ref = copy.deepcopy(dense)
    for lo, lp in zip(pa._blocks(ref), pa._blocks(pruned)):
        kept = _match_rows(lo.up.weight, lp.up.weight)
        drop = sorted(set(range(lo.up.weight.shape[0])) - set(kept))
        with torch.no_grad():
            lo.up.weight[drop] = 0
            lo.up.bias[drop] = 0
        size = lo.head_size
        heads = _match_rows(lo.q.weight, lp.q.weight, size)
        assert heads == _match_rows(lo.v.weight, lp.v.weight, size)
        if getattr(lp.attn, "head_index", None) is not None:  # MPNet: the kept heads' position-bias rows
            assert lp.attn.head_index.tolist() == heads
        n = lo.q.weight.shape[0] // size
        with torch.no_grad():
            for h in set(range(n)) - set(heads):
                lo.o.weight[:, h * size:(h + 1) * size] = 0
    return ref


def _check(pa, dense, pruned, result, probe, ffn_sparsity, head_sparsity, d_ff, heads, layers):
    assert set(result) >= {"seconds", "ffn_widths", "heads_per_layer", "params", "notes"}
    assert result["seconds"] > 0 and result["notes"]
    assert result["ffn_widths"] == pa.ffn_widths(pruned) and len(result["ffn_widths"]) == layers
    assert result["heads_per_layer"] == pa.heads_per_layer(pruned)
    assert result["params"] == pa.n_params(pruned) < pa.n_params(dense)
    assert sum(result["ffn_widths"]) < d_ff * layers
    assert abs(sum(result["ffn_widths"]) - d_ff * layers * (1 - ffn_sparsity)) <= layers
    if head_sparsity == 0:
        assert result["heads_per_layer"] == [heads] * layers
    else:
        assert sum(result["heads_per_layer"]) < heads * layers
        assert abs(sum(result["heads_per_layer"]) - heads * layers * (1 - head_sparsity)) <= layers
    assert min(result["heads_per_layer"]) >= 1 and min(result["ffn_widths"]) >= 1
    pa.check_consistent(pruned)
    for b in pa._blocks(pruned):
        assert b.attn.num_attention_heads * b.head_size == b.attn.all_head_size == b.q.out_features
    assert all(p.grad is None for p in pruned.parameters())
    with torch.no_grad():
        out = pruned(probe["input_ids"], probe["attention_mask"])
        one = pruned(probe["input_ids"][:1, :5], probe["attention_mask"][:1, :5])
        ref = _masked_reference(pa, dense, pruned)(probe["input_ids"], probe["attention_mask"])
    assert out.shape == (2,) and one.shape == (1,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


SPARSITIES = [(0.5, 0.25), (0.5, 0.0)]


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
@pytest.mark.parametrize("ffn_sparsity,head_sparsity", SPARSITIES)
def test_torch_pruning(torch_pruning, setup, importance, ffn_sparsity, head_sparsity):
    pa = _adapters()
    model, calib, probe = setup
    dense = copy.deepcopy(model)
    cfg = model.config
    result = pa.prune_with_torch_pruning(model, calib, ffn_sparsity=ffn_sparsity, head_sparsity=head_sparsity,
                                         importance=importance, loss_fn=loss_fn)
    _check(pa, dense, model, result, probe, ffn_sparsity, head_sparsity, cfg.intermediate_size,
           cfg.num_attention_heads, cfg.num_hidden_layers)


def test_torch_pruning_uniform(torch_pruning, setup):
    pa = _adapters()
    model, calib, probe = setup
    dense = copy.deepcopy(model)
    result = pa.prune_with_torch_pruning(model, calib, ffn_sparsity=0.5, head_sparsity=0.25, importance="taylor",
                                         loss_fn=loss_fn, global_pruning=False)
    assert len(set(result["ffn_widths"])) == 1 and result["heads_per_layer"] == [3, 3, 3]
    _check(pa, dense, model, result, probe, 0.5, 0.25, 37, 4, 3)


@pytest.mark.parametrize("ffn_sparsity,head_sparsity", SPARSITIES)
def test_textpruner(textpruner, setup, ffn_sparsity, head_sparsity):
    pa = _adapters()
    model, calib, probe = setup
    dense = copy.deepcopy(model)
    cfg = model.config
    result = pa.prune_with_textpruner(model, calib, ffn_sparsity=ffn_sparsity, head_sparsity=head_sparsity,
                                      loss_fn=loss_fn, n_iters=2)
    _check(pa, dense, model, result, probe, ffn_sparsity, head_sparsity, cfg.intermediate_size,
           cfg.num_attention_heads, cfg.num_hidden_layers)
    assert "prune_heads" not in vars(model.backbone)  # the transformers-4 shim is gone again


def test_textpruner_even(textpruner, setup):
    pa = _adapters()
    model, calib, probe = setup
    dense = copy.deepcopy(model)
    result = pa.prune_with_textpruner(model, calib, ffn_sparsity=0.5, head_sparsity=0.25, loss_fn=loss_fn,
                                      n_iters=1, even_masking=True)
    assert result["ffn_widths"] == [18] * 3 and result["heads_per_layer"] == [3] * 3
    _check(pa, dense, model, result, probe, 0.5, 0.25, 37, 4, 3)


def test_other_layouts_are_refused_by_name():
    pa = _adapters()
    model = make_classifier("tiny-distilbert").model
    with pytest.raises(ValueError, match="support model types bert, roberta, mpnet, got distilbert"):
        pa.ffn_widths(model)
