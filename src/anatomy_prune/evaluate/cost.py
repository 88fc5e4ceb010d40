"""Cost models: what an FFN neuron and an attention head cost per forward pass, so that pruning can aim at a
constraint (`--target-flops 0.5`, `--target-speedup 2.0`) rather than a sparsity.

  flops    exact FLOPs per token from the shapes: a neuron costs 2 x (its up / gate rows + its down column);
           a head costs 2 x (its q, k, v rows + its o columns) + the attention scores and weighted sum over
           the sequence (4 x seq_len x head_dim). Base: everything else (other Linear layers, the head).
  latency  measured: the model's own shapes are timed on the device at the given batch and length (dense,
           then FFNs and attention at reduced widths, physically pruned copies), and a linear model
           time = base + a_ffn x neurons + a_head x heads is fitted by least squares. It absorbs what FLOPs
           miss (memory traffic, kernel efficiency at narrow widths, fixed overheads) as an average per-unit
           cost; the fit's residuals are reported.
Both are linear in the number of units kept, which makes allocation under a budget a knapsack that the
allocator solves greedily by score per cost (plan.allocate.keep_under_budget).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.families import base_model, ffn_sites, ffn_widths, head_counts
from ..models.loading import Loaded
from ..models.surgery import keep_ffn_neurons, keep_heads
from .timing import fixed_inputs, forward_fn, machine_info, time_interleaved

log = logging.getLogger(__name__)
KINDS = ("flops", "latency")


@dataclass
class CostModel:
    kind: str                        # flops (per token) or latency (seconds per forward pass)
    base: float                      # what pruning cannot remove
    per_neuron: list[float]          # per layer, one FFN neuron
    per_head: list[float]            # per layer, one attention head (one KV group for grouped-query attention)
    neurons: list[int]               # units of the dense model, per layer
    heads: list[int]
    info: dict = field(default_factory=dict)

    @property
    def dense(self) -> float:
        return self.predict(self.neurons, self.heads)

    def predict(self, neurons: Sequence[int], heads: Sequence[int] | None = None) -> float:
        heads = self.heads if heads is None else heads
        return float(self.base + sum(a * n for a, n in zip(self.per_neuron, neurons))
                     + sum(a * h for a, h in zip(self.per_head, heads)))

    def to_dict(self) -> dict:
        return {**asdict(self), "dense": self.dense}


def _attention_shape(model: nn.Module) -> tuple[list[int], int, int]:
    """(units per layer, head_dim, query heads per unit) of the attention; units are heads, or KV groups for
    grouped-query attention."""
    cfg = base_model(model).config
    heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0)) or 0)
    d = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (d // heads if heads else 0))
    kv = int(getattr(cfg, "num_key_value_heads", heads) or heads)
    return head_counts(model), head_dim, max(1, heads // max(1, kv))


def flops_cost(loaded: Loaded, seq_len: int = 128) -> CostModel:
    """Exact FLOPs per token, split into what a neuron, a head and the rest cost."""
    from .counts import flops_per_token

    model = loaded.model
    base = base_model(model)
    cfg = base.config
    d = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    per_neuron = []
    for site in ffn_sites(model):
        per_neuron.append(2.0 * (len(site.up) * d + d))
    units, head_dim, q_per_unit = _attention_shape(model)
    kv_share = 1.0 / q_per_unit
    # a unit: its query heads' q rows and o columns, plus one k and one v head; scores and weighted sum
    per_head = [2.0 * d * head_dim * (2 * q_per_unit + 2) + 4.0 * seq_len * head_dim * q_per_unit] * len(units)
    neurons = ffn_widths(model)
    total = float(flops_per_token(model, seq_len))
    removable = sum(a * n for a, n in zip(per_neuron, neurons)) + sum(a * h for a, h in zip(per_head, units))
    return CostModel("flops", max(0.0, total - removable), per_neuron, per_head, neurons, units,
                     {"seq_len": seq_len, "kv_share": kv_share})


@torch.no_grad()
def latency_cost(loaded: Loaded, batch_size: int = 32, seq_len: int = 128, repeats: int = 3,
                 fractions: Sequence[float] = (1.0, 0.5, 0.25), seed: int = 0) -> CostModel:
    """Fit time = base + a_ffn * neurons + a_head * heads from timings of the model's own shapes on its
    device: the dense model and physically pruned copies with the FFNs (and, where heads can be pruned,
    the attention) at the given fractions of their width, timed interleaved."""
    model = loaded.model.eval()
    if seq_len > loaded.max_positions:
        raise UserError(f"length {seq_len} exceeds the model's {loaded.max_positions} positions")
    vocab = int(base_model(model).get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, batch_size, seq_len, loaded.device, seed)
    neurons = ffn_widths(model)
    units, _hd, _q = _attention_shape(model)
    variants: dict[str, tuple[nn.Module, int, int]] = {"dense": (model, sum(neurons), sum(units))}
    for f in fractions:
        if f >= 1.0:
            continue
        m = keep_ffn_neurons(copy.deepcopy(model), [range(max(1, int(round(f * w)))) for w in neurons])
        variants[f"ffn{f:g}"] = (m, sum(max(1, int(round(f * w))) for w in neurons), sum(units))
        if all(u > 1 for u in units):
            kept = [max(1, int(round(f * u))) for u in units]
            mh = keep_heads(copy.deepcopy(model), [range(k) for k in kept])
            variants[f"heads{f:g}"] = (mh, sum(neurons), sum(kept))
    timings = time_interleaved({k: forward_fn(m, inputs) for k, (m, _n, _h) in variants.items()},
                               warmup=1, repeats=repeats, device=loaded.device)
    names = list(variants)
    x = np.array([[1.0, variants[k][1], variants[k][2]] for k in names])
    y = np.array([timings[k].median for k in names])
    if len({tuple(r[1:]) for r in x}) < 2:
        raise UserError("the latency fit needs at least one pruned shape; give fractions below 1")
    has_heads = len({r[2] for r in x}) > 1
    cols = [0, 1, 2] if has_heads else [0, 1]
    coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
    c0, a_n = float(coef[0]), float(coef[1])
    a_h = float(coef[2]) if has_heads else 0.0
    pred = x[:, cols] @ coef
    info = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": str(loaded.device),
            "timed": {k: {"neurons": int(variants[k][1]), "heads": int(variants[k][2]),
                          "median_s": timings[k].median, "predicted_s": float(p)} for k, p in zip(names, pred)},
            "max_rel_residual": float(np.max(np.abs(pred - y) / y)), "heads_fitted": has_heads,
            "machine": machine_info()}
    n_layers = len(neurons)
    model_ = CostModel("latency", max(0.0, c0), [max(a_n, 0.0)] * n_layers, [max(a_h, 0.0)] * n_layers,
                       neurons, units, info)
    log.info("latency cost model: base %.4f s, %.2e s per neuron, %.2e s per head; max residual %.1f%%",
             model_.base, a_n, a_h, 100 * info["max_rel_residual"])
    return model_
