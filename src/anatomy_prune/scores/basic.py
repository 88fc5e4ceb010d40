"""Three scorers: the paper's random baseline (the anatomy's important neurons kept unless protect=False),
weight magnitude (||input rows|| x ||output column||, no data; fine-pruning's magnitude method uses it too)
and mean |activation| over the calibration texts' real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.families import base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from .calibration import PROTECT_THRESHOLD, Calibration, activation_stats, important_neurons, similarity_stats
from .registry import Scores, register


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> list[Tensor]:
    """Per neuron: L2 norm of its input weights (all up / gate rows) times the norm of its output column,
    from the weights as they are now, on their device: [d_ff] per layer."""
    base = base_model(model)
    scores = []
    for site in ffn_sites(model):
        w_in = torch.cat([weight_out_in(get_module(base, p)).detach() for p in site.up], dim=1)  # [d_ff, k*d]
        w_out = weight_out_in(get_module(base, site.down)).detach()                              # [d_model, d_ff]
        scores.append(w_in.float().norm(dim=1) * w_out.float().norm(dim=0))
    return scores


@dataclass(frozen=True)
class RandomOptions:
    """The random baseline's options: keep the anatomy's important neurons (similarity above `threshold`),
    and the draw's seed (None: the calibration's), so a sweep can repeat the baseline."""

    protect: bool = True
    threshold: float = PROTECT_THRESHOLD
    seed: int | None = None


@register("random", "random neurons (the paper's baseline), same fraction per layer, keeping the anatomy's "
          "important neurons (similarity > 0.35 for any calibration input) unless protect=False",
          stochastic=True, options=RandomOptions)
def random_scores(calib: Calibration, sparsity: float, opts: RandomOptions = RandomOptions()) -> Scores:
    """Uniform random scores, the protected neurons kept whatever their score."""
    protect, threshold = opts.protect, opts.threshold
    seed = calib.seed if opts.seed is None else int(opts.seed)
    g = torch.Generator().manual_seed(seed)
    values = [torch.rand(w, generator=g) for w in ffn_widths(calib.loaded.model)]
    keep = important_neurons(calib, threshold) if protect else None
    params = {"protect": bool(protect)}
    if protect:
        params.update(threshold=threshold, protected_per_layer=[len(k) for k in keep],
                      calib_inputs=similarity_stats(calib)["n_inputs"])
    return Scores(values, params=params, must_keep=keep, seed=seed)


@register("magnitude", "weight norm of each neuron (input rows x output column); no data",
          needs_data=False)
def magnitude(calib: Calibration, sparsity: float) -> Scores:
    values = calib.cached("magnitude", lambda: [s.cpu() for s in magnitude_scores(calib.loaded.model)])
    return Scores(values, seed=calib.seed)


@register("activation", "mean |activation| of each neuron over the calibration reviews' real tokens")
def activation(calib: Calibration, sparsity: float) -> Scores:
    return Scores(activation_stats(calib), params={"calib_inputs": len(calib.texts)}, seed=calib.seed)
