"""The `calibrated` scorer: sensitivity scores on the calibration set, per-layer budgets from one global
ranking with a floor per layer, and a recipe for least-squares compensation (apply.compensate), which the
pruning step applies. What it builds on: Fisher information of neuron masks (Kwon et al. 2022, "A Fast
Post-Training Pruning Framework for Transformers"); the error a removal leaves in the layer output and its
compensation by a bias / least-squares refit (FLAP, An et al. 2024; ThiNet, Luo et al. 2017; ZipLM, Kurtic
et al. 2023). What it adds: the two terms in one score, the leave-one-out share that the refit cannot rebuild,
a readout-token weighting for classifiers, and the refit folded into a physically smaller dense model.

Scores (higher = keep), from one pass of `compensate.ffn_input_stats` with gradients:
  fisher   sum over examples of (dL_i/dm_j)^2, the Fisher information of neuron j's mask (Kwon et al. 2022):
           the expected loss increase, to second order, of zeroing the neuron.
  taylor   |sum over examples of dL_i/dm_j|, first-order Taylor (the loss change of removing it).
L is the task loss for a classifier (labels of the calibration texts) and the LM loss for a causal LM.

The recipe adds (beta) the error each neuron's removal leaves in its layer's output after compensation:
Fisher alone, measured on the calibration examples, misses neurons whose removal barely moves the loss
there but shifts the residual stream a lot (at 70% on the fine-tuned minilm, validation reviews: agreement
with the dense predictions 0.93 with Fisher alone, 0.98 with beta = 1).

Fisher scores are in units of the loss, so they compare across layers as they are; the global ranking uses
them raw (normalize="none"); normalize="mean" divides each layer by its mean score first
(the allocator's option for scores in arbitrary units), which lost 3 points at 50% in the same measurement.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ..errors import UserError
from ..models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from .calibration import DEFAULT_RIDGE, Calibration, FFNStats, ffn_input_stats
from .registry import Scores, register

log = logging.getLogger(__name__)

SCORES = ("fisher", "taylor")
MAX_AUTO_FLOOR = 0.2      # floor=None: min(0.2, 2/3 of the mean kept fraction), so every sparsity < 1 works
DEFAULT_BETA = 1.0
DEFAULT_READOUT_MIX = 0.5  # classifiers: half of the last layer's fit weight on the readout token


def auto_floor(sparsity: float) -> float:
    """The floor used when none is given: 20% of each layer, less at high sparsity (2/3 of 1 - sparsity)."""
    return round(min(MAX_AUTO_FLOOR, (1.0 - sparsity) * 2.0 / 3.0), 4)


def unexplained_share(gram: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """Per neuron, the fraction of its centred activation energy that a ridge least-squares fit on all
    other neurons of the layer (and a constant) leaves unexplained, in (0, 1]: [d_ff].

    For a Gram of [h; 1], the centred covariance C gives it in closed form: 1 / (C_jj * (C + lam I)^-1_jj).
    """
    n = gram[-1, -1].clamp(min=1.0)
    mean = gram[:-1, -1] / n                                          # [d_ff]
    cov = gram[:-1, :-1] / n - torch.outer(mean, mean)                # [d_ff, d_ff]
    var = torch.diagonal(cov).clamp(min=1e-12)
    lam = ridge * float(var.mean())
    a = cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype)
    chol, info = torch.linalg.cholesky_ex(a)                          # SPD for lam > 0: half the cost of inv
    inv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(a)
    return (1.0 / (var * torch.diagonal(inv))).clamp(0.0, 1.0)


def layer_removal_error(down, gram: Tensor, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE,
                        share=None, rows: int = 1024) -> Tensor:
    """Per neuron of one layer, the mean squared error its removal leaves in the layer output per token: [d_ff].

    ||w_j||^2 times the neuron's centred variance (its mean goes into the down bias) or, for a bias-free
    down projection, its second moment; with `rebuilt`, times the share that a least-squares fit on the
    other neurons cannot rebuild (leave-one-out, so optimistic when many neurons go), computed by `share`
    (default unexplained_share). The weight is squared `rows` output rows at a time (big layers)."""
    g = gram.detach().double().cpu() if gram.device.type != "cpu" else gram.detach()
    w = weight_out_in(down).detach()                                      # [d_model, d_ff]
    w2 = torch.zeros(w.shape[1], dtype=torch.float64)
    for r in range(0, w.shape[0], rows):
        w2 += w[r:r + rows].double().cpu().pow(2).sum(0)
    n = float(g[-1, -1].clamp(min=1.0))
    moment = torch.diagonal(g)[:-1] / n                                   # [d_ff]
    if getattr(down, "bias", None) is not None:
        moment = moment - (g[:-1, -1] / n) ** 2
    err = w2 * moment.clamp(min=0.0)
    if rebuilt:
        err = err * (share or unexplained_share)(g, ridge)
    return err.float()


def removal_error(model, stats: FFNStats, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE) -> list[Tensor]:
    """layer_removal_error of every FFN layer of `model`, from its calibration statistics."""
    base = base_model(model)
    return [layer_removal_error(get_module(base, site.down), g, rebuilt, ridge)
            for site, g in zip(ffn_sites(model), stats.gram)]


def sensitivity_scores(stats: FFNStats, score: str = "fisher", beta: float = 0.0, model=None,
                       rebuilt: bool = True, ridge: float = DEFAULT_RIDGE) -> list[Tensor]:
    """One score per neuron and layer (higher = keep) from calibration statistics with gradients.

    beta > 0 adds the removal error of each neuron (`removal_error`, needs the model), both terms divided
    by their mean over all neurons of all layers: score / mean(score) + beta * error / mean(error).
    """
    if score not in SCORES:
        raise UserError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
    if stats.fisher is None or stats.taylor is None:
        raise UserError("these calibration statistics have no gradients; collect them with grads=True "
                        "on a classifier with labels or on a causal LM")
    if score == "taylor":
        scores = [t.abs().float() for t in stats.taylor]
    else:
        scores = [f.float() for f in stats.fisher]
    if beta > 0:
        if model is None:
            raise ValueError("beta > 0 needs the model (its down projections)")
        errs = removal_error(model, stats, rebuilt, ridge)
        s_mean = torch.cat(scores).mean().clamp(min=1e-30)
        e_mean = torch.cat(errs).mean().clamp(min=1e-30)
        scores = [s / s_mean + beta * e / e_mean for s, e in zip(scores, errs)]
    return scores


def head_removal_error(model, stats: FFNStats) -> list[Tensor]:
    """Per head unit, the mean squared error its removal leaves in the attention output per token, before
    any refit: trace(W_u C_u W_u^T), W_u the output projection's columns of the unit's heads and C_u the
    (centred, where the projection has a bias to carry the mean) second moment of their context: [units]."""
    base = base_model(model)
    errs = []
    for site, g in zip(attention_sites(model), stats.head_gram):
        o = get_module(base, site.o)
        w = weight_out_in(o).detach().double().cpu()                          # [d_model, heads*head_dim]
        n = float(g[-1, -1].clamp(min=1.0))
        m2 = g[:-1, :-1] / n
        if getattr(o, "bias", None) is not None:
            mu = g[:-1, -1] / n
            m2 = m2 - torch.outer(mu, mu)
        out = []
        for u in range(site.n_units):
            cols = torch.tensor(site.q_features([u]), dtype=torch.long)
            wu = w[:, cols]
            out.append(float(((wu @ m2[cols][:, cols]) * wu).sum()))
        errs.append(torch.tensor(out, dtype=torch.float32).clamp(min=0.0))
    return errs


def joint_scores(stats: FFNStats, model, score: str = "fisher", beta: float = DEFAULT_BETA, rebuilt: bool = True,
                 ridge: float = DEFAULT_RIDGE) -> tuple[list[Tensor], list[Tensor]]:
    """Scores of FFN neurons and attention head units on one scale, so one ranking (or one budget) covers
    both: Fisher information of each unit's mask (loss units for both kinds) divided by its mean over all
    units, plus beta x the error its removal leaves divided by that error's mean over all units."""
    if stats.head_fisher is None:
        raise ValueError("joint scores need statistics collected with heads=True")
    f_n = [(t.abs() if score == "taylor" else f).float() for f, t in zip(stats.fisher, stats.taylor)]
    f_h = [(t.abs() if score == "taylor" else f).float() for f, t in zip(stats.head_fisher, stats.head_taylor)]
    f_mean = torch.cat(f_n + f_h).mean().clamp(min=1e-30)
    neurons, heads = [f / f_mean for f in f_n], [f / f_mean for f in f_h]
    if beta > 0:
        e_n = removal_error(model, stats, rebuilt, ridge)
        e_h = head_removal_error(model, stats)
        e_mean = torch.cat(e_n + e_h).mean().clamp(min=1e-30)
        neurons = [s + beta * e / e_mean for s, e in zip(neurons, e_n)]
        heads = [s + beta * e / e_mean for s, e in zip(heads, e_h)]
    return neurons, heads


@register("calibrated", "Fisher sensitivity of each neuron on the calibration set plus the error its removal "
          "leaves after compensation, per-layer budgets from one global ranking with a floor per layer, and "
          "least-squares compensation folded into the down projection (prune applies it)",
          floor=None, score="fisher", beta=DEFAULT_BETA, rebuilt=True, normalize="none", ridge=DEFAULT_RIDGE,
          readout_mix=DEFAULT_READOUT_MIX, heads=False, head_sparsity=None)
def calibrated_scores(calib: Calibration, sparsity: float, floor: float | None = None, score: str = "fisher",
                      beta: float = DEFAULT_BETA, rebuilt: bool = True, normalize: str = "none",
                      ridge: float = DEFAULT_RIDGE, readout_mix: float = DEFAULT_READOUT_MIX, heads: bool = False,
                      head_sparsity: float | None = None) -> Scores:
    """Scores, a global allocation with a floor, and the compensation recipe (ridge, readout_mix).

    floor=None: auto_floor(sparsity); a given floor that the sparsity cannot respect is a UserError.
    heads=True (or a head_sparsity) also scores the attention head units on the same scale as the neurons
    (joint_scores), for a target that prunes both (pipeline.step with a FLOP or latency target) or for
    head_sparsity, the fraction of head units removed (one ranking over all layers, the same floor)."""
    beta, ridge, readout_mix = (_number(beta, "beta", 0.0), _number(ridge, "ridge", 0.0),
                                _number(readout_mix, "readout_mix", 0.0, 1.0))
    heads = bool(heads) or head_sparsity is not None
    stats = ffn_input_stats(calib.loaded, calib, grads=True, heads=heads)
    if stats.readout_gram is None:
        readout_mix = 0.0   # only classifiers read one token out
    floor_used = auto_floor(sparsity if sparsity is not None else 0.0) if floor is None else float(floor)
    head_values = None
    if heads:
        values, head_values = joint_scores(stats, calib.loaded.model, score, beta, rebuilt, ridge)
    else:
        values = sensitivity_scores(stats, score, beta, calib.loaded.model, rebuilt, ridge)
    params = dict(score=score, beta=beta, rebuilt=rebuilt, floor_auto=floor is None, calib_inputs=stats.n_examples,
                  calib_tokens=stats.n_tokens, calib_max_length=stats.info.get("max_length"))
    return Scores(values, {"kind": "global", "floor": floor_used, "normalize": normalize}, params,
                  compensation={"ridge": ridge, "readout_mix": readout_mix}, seed=calib.seed, head_values=head_values,
                  head_sparsity=head_sparsity)


def _number(x, what: str, lo: float, hi: float = math.inf) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [{lo}, {hi}], got {x!r}") from None
    if isinstance(x, bool) or not lo <= v <= hi:
        raise UserError(f"{what} must be in [{lo}, {hi}], got {x!r}")
    return v
