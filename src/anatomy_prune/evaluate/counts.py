"""Counts: parameters, FLOPs per token, and the FLOP bound a pruned model's speedup is held to.

Removing FFN neurons removes their FLOPs and nothing else, so a pruned model can at best be
flops_per_token(dense) / flops_per_token(pruned) times faster. That is an approximate bound: what is not
counted as FLOPs (layer norms, softmax, residual adds, embedding lookups) does not shrink, while the FFN's
activation function and biases do shrink with the width without being counted; a measured speedup a little
above the bound is therefore possible, not only noise.
"""
from __future__ import annotations

from torch import nn

from ..models.families import Conv1D, base_model, ffn_sites, ffn_widths, get_module, in_features, out_features
from ..models.loading import Loaded


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, seq_len: int = 128) -> int:
    """Forward FLOPs per token of the transformer blocks and heads: 2 * in * out for every Linear / Conv1D
    applied to each token, plus attention's scores and weighted sum (4 * seq_len * d_model per layer).
    Embedding lookups are free; a decoder's LM head counts (it is a Linear)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) or (Conv1D and isinstance(mod, Conv1D)):
            total += 2 * in_features(mod) * out_features(mod)
    cfg = base_model(model).config
    total += 4 * seq_len * cfg.hidden_size * len(ffn_widths(model))
    return int(total)


def ffn_flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of the FFNs alone (what FFN pruning removes)."""
    base = base_model(model)
    total = 0
    for site in ffn_sites(model):
        for path in site.up + (site.down,):
            mod = get_module(base, path)
            total += 2 * in_features(mod) * out_features(mod)
    return int(total)


def size_report(loaded: Loaded, seq_len: int = 128) -> dict:
    widths = ffn_widths(loaded.model)
    return {"params": count_params(loaded.model), "ffn_widths": widths, "ffn_neurons": sum(widths),
            "flops_per_token": flops_per_token(loaded.model, seq_len),
            "ffn_flops_per_token": ffn_flops_per_token(loaded.model), "flops_seq_len": seq_len}


def ideal_speedup(dense_flops: float, pruned_flops: float) -> float:
    """The approximate FLOP bound: how many times faster the pruned model can be (see the module doc)."""
    if pruned_flops <= 0:
        raise ValueError(f"pruned FLOPs must be positive, got {pruned_flops}")
    return float(dense_flops) / float(pruned_flops)


def model_ideal_speedup(dense: nn.Module, pruned: nn.Module, seq_len: int) -> float:
    """ideal_speedup from the two models' FLOPs per token at seq_len (attention's seq term included)."""
    return ideal_speedup(flops_per_token(dense, seq_len), flops_per_token(pruned, seq_len))


def embedding_params(model: nn.Module) -> int:
    """Parameters of the embedding tables (token, position, type); FFN pruning never touches them."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
