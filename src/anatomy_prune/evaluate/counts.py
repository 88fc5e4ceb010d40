"""Counts: parameters, FLOPs per token, and the FLOP bound a pruned model's speedup is held to.

Removing FFN neurons removes their FLOPs and nothing else, so a pruned model can at best be
flops_per_token(dense) / flops_per_token(pruned) times faster. That is an approximate bound: what is not
counted as FLOPs (layer norms, softmax, residual adds, embedding lookups) does not shrink, while the FFN's
activation function and biases do shrink with the width without being counted; a measured speedup a little
above the bound is therefore possible, not only noise.
"""
from __future__ import annotations

from torch import nn

from ..models.families import Conv1D, attention_sites, base_model, ffn_sites, get_module, in_features, out_features
from ..models.loading import Loaded
from ..models.quantize import is_quantized_linear


def _dims(mod: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear, a Conv1D or a dynamically quantized Linear; None for other modules."""
    if isinstance(mod, nn.Linear) or (Conv1D and isinstance(mod, Conv1D)):
        return in_features(mod), out_features(mod)
    if is_quantized_linear(mod):
        return int(mod.in_features), int(mod.out_features)
    return None


def count_params(model: nn.Module) -> int:
    """Parameters, the int8 weights of quantized Linear layers included (they are packed, not parameters)."""
    total = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if is_quantized_linear(mod):
            w, b = mod.weight(), mod.bias()
            total += w.numel() + (b.numel() if b is not None else 0)
    return total


def _ffn_widths(model: nn.Module) -> list[int]:
    """FFN widths, also of a model whose Linear layers were quantized (families.ffn_widths reads float weights)."""
    base = base_model(model)
    return [_dims(get_module(base, s.up[0]))[1] for s in ffn_sites(model)]


def flops_per_token(model: nn.Module, seq_len: int = 128) -> int:
    """Forward FLOPs per token of the transformer blocks and heads: 2 * in * out for every Linear / Conv1D
    applied to each token, plus attention's scores and weighted sum (4 * seq_len * head_dim per query head
    kept, per layer; 4 * seq_len * d_model for an unpruned layer). Embedding lookups are free; a decoder's
    LM head counts (it is a Linear)."""
    total = 0
    for mod in model.modules():
        dims = _dims(mod)
        if dims:
            total += 2 * dims[0] * dims[1]
    total += sum(4 * seq_len * s.n_heads * s.head_dim for s in attention_sites(model))
    return int(total)


def ffn_flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of the FFNs alone (what FFN pruning removes)."""
    base = base_model(model)
    total = 0
    for site in ffn_sites(model):
        for path in site.up + (site.down,):
            i, o = _dims(get_module(base, path))
            total += 2 * i * o
    return int(total)


def size_report(loaded: Loaded, seq_len: int = 128) -> dict:
    widths = _ffn_widths(loaded.model)
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
