"""Three scorers: the paper's random baseline (the anatomy's important neurons kept unless protect=False),
weight magnitude (||input rows|| x ||output column||, no data; fine-pruning's magnitude method uses it too)
and mean |activation| over the calibration texts' real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.families import attention_sites, base_model, ffn_sites, ffn_widths, get_module, weight_out_in
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


@torch.no_grad()
def head_magnitude_scores(model: nn.Module) -> list[Tensor]:
    """Per head unit, as for neurons: the norm of its q, k and v rows times the norm of its output columns
    (the output projection's columns of its query heads): [units] per layer."""
    base = base_model(model)
    out = []
    for s in attention_sites(model):
        q = weight_out_in(get_module(base, s.q)).detach().float()
        o = weight_out_in(get_module(base, s.o)).detach().float()
        width = s.n_heads * s.head_dim                       # a fused q|k|v projection: k from here, v after
        k = q[width:] if s.fused else weight_out_in(get_module(base, s.k)).detach().float()
        v = q[width + s.n_kv_heads * s.head_dim:] if s.fused else weight_out_in(get_module(base, s.v)).detach().float()
        norms = []
        for u in range(s.n_units):
            qf, kvf = s.q_features([u]), s.kv_features([u])
            w_in = torch.cat([q[qf], k[kvf], v[kvf]])        # [rows of the unit, d_model]
            norms.append(w_in.norm() * o[:, qf].norm())
        out.append(torch.stack(norms).cpu() if norms else torch.zeros(0))
    return out


@dataclass(frozen=True)
class MagnitudeOptions:
    """heads: also score the attention head units (their q, k, v rows x their output columns)."""

    heads: bool = False


@register("magnitude", "weight norm of each neuron (input rows x output column), and of each head unit with "
          "heads=True; no data", needs_data=False, options=MagnitudeOptions)
def magnitude(calib: Calibration, sparsity: float, opts: MagnitudeOptions = MagnitudeOptions()) -> Scores:
    values = calib.cached("magnitude", lambda: [s.cpu() for s in magnitude_scores(calib.loaded.model)])
    heads = calib.cached("magnitude-heads", lambda: head_magnitude_scores(calib.loaded.model)) if opts.heads else None
    return Scores(values, seed=calib.seed, head_values=heads)


@register("activation", "mean |activation| of each neuron over the calibration reviews' real tokens")
def activation(calib: Calibration, sparsity: float) -> Scores:
    return Scores(activation_stats(calib), params={"calib_inputs": len(calib.texts)}, seed=calib.seed)
