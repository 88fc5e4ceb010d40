"""The `fluctuation` scorer (FLAP, An et al. 2024): how much each unit's input to the output projection varies
around its mean over the calibration tokens, weighted by its column's squared norm, sum over tokens of
||W_j (x_j - mean x_j)||^2 / n. It is the error a removal leaves once its mean is folded into the bias
(apply.bias), so it pairs with bias compensation. Heads: the sum over a unit's context features.
Built on the calibration pass the calibrated scorer uses (the same Gram matrices), so the two compare fairly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import column_energy, moment_diagonal
from ..models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from .calibration import Calibration, calibration_pass
from .registry import Scores, register


def fluctuation(proj, gram: Tensor) -> Tensor:
    """Per input feature of `proj`: its variance over tokens x the squared norm of its column: [d_in]."""
    g = gram.detach().double().cpu()
    return (moment_diagonal(g, centred=True).clamp(min=0.0) * column_energy(weight_out_in(proj))).float()


@dataclass(frozen=True)
class FluctuationOptions:
    """heads: also score the attention head units (a unit: the sum over its query heads' context features)."""

    heads: bool = False


@register("fluctuation", "FLAP's fluctuation: variance of each neuron's (or head's) input to the output "
          "projection x its weights' squared norm; pair it with bias compensation (--compensation bias)",
          options=FluctuationOptions)
def fluctuation_scores(calib: Calibration, sparsity: float | None,
                       opts: FluctuationOptions = FluctuationOptions()) -> Scores:
    """Fluctuation of every FFN neuron and, with heads, every head unit, from one calibration pass."""
    model = calib.loaded.model
    stats = calibration_pass(calib, grads=True if opts.heads else None, heads=opts.heads)
    base = base_model(model)
    values = [fluctuation(get_module(base, s.down), stats.ffn.gram[s.layer]) for s in ffn_sites(model)]
    head_values = None
    if opts.heads:
        head_values = []
        for s in attention_sites(model):
            per_feature = fluctuation(get_module(base, s.o), stats.heads.gram[s.layer])
            head_values.append(torch.stack([per_feature[s.q_features([u])].sum() for u in range(s.n_units)])
                               if s.n_units else torch.zeros(0))
    return Scores(values, params={"calib_inputs": stats.ffn.n_examples, "calib_tokens": stats.ffn.n_tokens},
                  seed=calib.seed, head_values=head_values)
