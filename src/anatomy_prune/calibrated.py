"""The `calibrated` method: sensitivity scores on the calibration set, per-layer budgets from one global
ranking with a floor per layer, and least-squares compensation (compensate.py) applied by the prune pipeline.

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
them raw (normalize="none"); normalize="mean" divides each layer by its mean score as
plan.keep_counts(allocation="global") does, which lost 3 points at 50% in the same measurement.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .compensate import DEFAULT_RIDGE, FFNStats, ffn_input_stats
from .errors import UserError
from .families import base_model, ffn_sites, get_module, weight_out_in
from .methods import Calibration, register
from .plan import PruningPlan, check_sparsity

log = logging.getLogger(__name__)

SCORES = ("fisher", "taylor")
NORMALIZE = ("none", "mean")
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
    inv = torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype))
    return (1.0 / (var * torch.diagonal(inv))).clamp(0.0, 1.0)


def removal_error(model, stats: FFNStats, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE) -> list[Tensor]:
    """Per neuron, the mean squared error its removal leaves in the layer output per token: [d_ff] per layer.

    ||w_j||^2 times the neuron's centred variance (its mean goes into the down bias) or, for a bias-free
    down projection, its second moment; with `rebuilt`, times the share that a least-squares fit on the
    other neurons cannot rebuild (leave-one-out, so optimistic when many neurons go).
    """
    base = base_model(model)
    errs = []
    for site, g in zip(ffn_sites(model), stats.gram):
        down = get_module(base, site.down)
        w2 = weight_out_in(down).detach().double().cpu().pow(2).sum(0)      # [d_ff]
        n = float(g[-1, -1].clamp(min=1.0))
        moment = torch.diagonal(g)[:-1] / n                                  # [d_ff]
        if getattr(down, "bias", None) is not None:
            moment = moment - (g[:-1, -1] / n) ** 2
        err = w2 * moment.clamp(min=0.0)
        if rebuilt:
            err = err * unexplained_share(g, ridge)
        errs.append(err.float())
    return errs


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


def global_keep_counts(scores: list[Tensor], sparsity: float, floor: float = MAX_AUTO_FLOOR,
                       normalize: str = "none") -> list[int]:
    """How many neurons each layer keeps: every neuron above its layer's floor competes in one ranking.

    floor: the fraction of its neurons that every layer keeps at least. A sparsity that would leave a
    layer below its floor is a UserError (nothing is planned).
    """
    check_sparsity(sparsity)
    if normalize not in NORMALIZE:
        raise UserError(f"unknown normalize '{normalize}'; choose one of {', '.join(NORMALIZE)}")
    if not 0.0 <= floor <= 1.0:
        raise UserError(f"floor must be in [0, 1], got {floor}")
    widths = [int(s.numel()) for s in scores]
    total = sum(widths)
    n_keep = total - int(round(sparsity * total))
    floors = [min(w, int(math.ceil(floor * w))) for w in widths]
    if sum(floors) > n_keep:
        raise UserError(f"sparsity {sparsity} would leave layers below the floor of {floor:.0%} of their "
                        f"neurons; lower the sparsity to at most {math.floor((1 - sum(floors) / total) * 1e4) / 1e4} "
                        "or lower the floor")
    pool_s, pool_l = [], []
    for layer, s in enumerate(scores):
        s = s.detach().double().cpu()
        if normalize == "mean":
            s = s / (s.abs().mean() + 1e-30)
        rest = torch.sort(s, descending=True).values[floors[layer]:]  # the floor's best are kept anyway
        pool_s.append(rest)
        pool_l.append(torch.full((rest.numel(),), layer, dtype=torch.long))
    counts = list(floors)
    take = n_keep - sum(floors)
    if take > 0:
        pool = torch.cat(pool_s)
        best = torch.argsort(pool, descending=True, stable=True)[:take]
        for layer in torch.cat(pool_l)[best].tolist():
            counts[layer] += 1
    return counts


def plan_from_stats(stats: FFNStats, sparsity: float, *, score: str = "fisher", floor: float | None = None,
                    beta: float = DEFAULT_BETA, model=None, rebuilt: bool = True, normalize: str = "none",
                    ridge: float = DEFAULT_RIDGE, readout_mix: float = DEFAULT_READOUT_MIX) -> PruningPlan:
    """The calibrated plan: scores, global budgets with a floor, the best of each layer kept. The plan
    carries its compensation recipe (compensate, ridge, readout_mix) in plan.params for `compensate`."""
    if beta < 0:
        raise UserError(f"beta must be >= 0, got {beta}")
    if stats.readout_gram is None:
        readout_mix = 0.0   # only classifiers read one token out
    floor_used = auto_floor(sparsity) if floor is None else float(floor)
    scores = sensitivity_scores(stats, score, beta, model, rebuilt, ridge)
    counts = global_keep_counts(scores, sparsity, floor_used, normalize)
    keep = [sorted(torch.argsort(s.double(), descending=True, stable=True)[:n].tolist())
            for s, n in zip(scores, counts)]
    params = dict(sparsity=sparsity, score=score, beta=beta, rebuilt=rebuilt, allocation="global",
                  normalize=normalize, floor=floor_used, floor_auto=floor is None, compensate=True, ridge=ridge,
                  readout_mix=readout_mix, calib_inputs=stats.n_examples, calib_tokens=stats.n_tokens,
                  calib_max_length=stats.info.get("max_length"))
    return PruningPlan(keep=keep, widths=[int(s.numel()) for s in scores], method="calibrated", params=params)


@register("calibrated", "Fisher sensitivity of each neuron on the calibration set plus the error its removal "
          "leaves after compensation, per-layer budgets from one global ranking with a floor per layer, and "
          "least-squares compensation folded into the down projection (prune applies it)",
          floor=None, score="fisher", beta=DEFAULT_BETA, rebuilt=True, normalize="none", ridge=DEFAULT_RIDGE,
          readout_mix=DEFAULT_READOUT_MIX)
def calibrated_method(calib: Calibration, sparsity: float, floor: float | None = None, score: str = "fisher",
                      beta: float = DEFAULT_BETA, rebuilt: bool = True, normalize: str = "none",
                      ridge: float = DEFAULT_RIDGE, readout_mix: float = DEFAULT_READOUT_MIX) -> PruningPlan:
    """Plan for `calibrated`; plan.params["compensate"] tells the prune pipeline to compensate.

    floor=None: auto_floor(sparsity); a given floor that the sparsity cannot respect is a UserError.
    """
    stats = ffn_input_stats(calib.loaded, calib, grads=True)
    plan = plan_from_stats(stats, sparsity, score=score, floor=floor, beta=beta, model=calib.loaded.model,
                           rebuilt=rebuilt, normalize=normalize, ridge=ridge, readout_mix=readout_mix)
    plan.seed = calib.seed
    return plan
