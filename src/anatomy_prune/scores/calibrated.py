"""The `calibrated` scorer: Fisher sensitivity of each neuron's mask on the calibration set (Kwon et al. 2022)
plus beta x the error its removal leaves in the layer output after a least-squares refit (FLAP, An et al.
2024; ThiNet; ZipLM). The method's request defaults (pipeline.allocation.resolve) are per-layer budgets
from one global ranking with a floor (auto_floor) and the refit's recipe (ridge, readout_mix), which the
pruning step applies (apply.compensate).

  fisher   sum over examples of (dL_i/dm_j)^2: the expected loss increase, to second order, of zeroing j.
  taylor   |sum over examples of dL_i/dm_j|: the first-order loss change of removing it.
L is the task loss for a classifier (labels of the calibration texts) and the LM loss for a causal LM. Fisher
scores are in loss units, so the global ranking uses them raw (normalize="none"); the error term catches
neurons that barely move the loss on the calibration examples but shift the residual stream a lot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..linalg import (DEFAULT_RIDGE, column_energy, elimination_path, moment_diagonal, quad, second_moment,
                      removal_path, unexplained_share)
from ..models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from ..validate import finite, flag, optional
from .calibration import Calibration, FFNStats, HeadStats, calibration_pass
from .registry import Scores, register

log = logging.getLogger(__name__)

SCORES = ("fisher", "taylor")
MAX_AUTO_FLOOR = 0.2      # no floor given: min(0.2, 2/3 of the mean kept fraction), so every sparsity < 1 works
DEFAULT_BETA = 1.0
DEFAULT_READOUT_MIX = 0.5  # classifiers: half of the last layer's fit weight on the readout token


def auto_floor(sparsity: float) -> float:
    """The floor used when none is given: 20% of each layer, less at high sparsity (2/3 of 1 - sparsity)."""
    return round(min(MAX_AUTO_FLOOR, (1.0 - sparsity) * 2.0 / 3.0), 4)


def neuron_path_default(kind: str, heads: bool) -> bool:
    """Whether neurons are scored along their layer's elimination path when the request does not say: with heads
    (joint plans, where leave-one-out priced neurons too cheaply against heads) and for a causal LM; an encoder's FFN
    alone keeps leave-one-out (even there on held-out reviews at 50-85%, and faster). README, techniques tried."""
    return bool(heads) or kind == "causal-lm"


def layer_removal_error(down, gram: Tensor, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE, path: bool = False
                        ) -> Tensor:
    """Per neuron of one layer, the mean squared error its removal leaves in the layer output per token: [d_ff].

    ||w_j||^2 times the neuron's centred variance (its mean goes into the down bias) or, for a bias-free
    down projection, its second moment; with `rebuilt`, times the share that a least-squares fit on the
    other neurons cannot rebuild (leave-one-out, so optimistic when many neurons go); with `path` too, the
    neuron's step on the layer's elimination path (linalg.elimination_path: the refit updated as neurons go)."""
    g = gram.detach().double().cpu()
    centred = getattr(down, "bias", None) is not None
    if rebuilt and path:
        return elimination_path(g, weight_out_in(down), centred, ridge)[1].float()
    moment = moment_diagonal(g, centred=centred)                                       # [d_ff]
    err = column_energy(weight_out_in(down)) * moment.clamp(min=0.0)
    if rebuilt:
        err = err * unexplained_share(g, ridge)
    return err.float()


def removal_error(model, stats: FFNStats, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE, path: bool = False
                  ) -> list[Tensor]:
    """layer_removal_error of every FFN layer of `model`, from its calibration statistics."""
    base = base_model(model)
    return [layer_removal_error(get_module(base, site.down), g, rebuilt, ridge, path)
            for site, g in zip(ffn_sites(model), stats.gram)]


def _sensitivity(stats: FFNStats | HeadStats, score: str) -> list[Tensor]:
    """Per layer, each unit's Fisher sum or |Taylor sum| (float32), refused when there are no gradients."""
    if score not in SCORES:
        raise UserError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
    if stats.fisher is None or stats.taylor is None:
        raise UserError("these calibration statistics have no gradients; collect them with grads=True "
                        "on a classifier with labels or on a causal LM")
    return [t.abs().float() for t in stats.taylor] if score == "taylor" else [f.float() for f in stats.fisher]


def sensitivity_scores(stats: FFNStats, score: str = "fisher", beta: float = 0.0, model=None,
                       rebuilt: bool = True, ridge: float = DEFAULT_RIDGE, path: bool = False) -> list[Tensor]:
    """One score per neuron and layer (higher = keep) from calibration statistics with gradients.

    beta > 0 adds the removal error of each neuron (`removal_error`, needs the model), both terms divided
    by their mean over all neurons of all layers: score / mean(score) + beta * error / mean(error).
    """
    scores = _sensitivity(stats, score)
    if beta > 0:
        if model is None:
            raise ValueError("beta > 0 needs the model (its down projections)")
        errs = removal_error(model, stats, rebuilt, ridge, path)
        s_mean = torch.cat(scores).mean().clamp(min=1e-30)
        e_mean = torch.cat(errs).mean().clamp(min=1e-30)
        scores = [s / s_mean + beta * e / e_mean for s, e in zip(scores, errs)]
    return scores


def head_removal_error(model, heads: HeadStats, rebuilt: bool = False, ridge: float = DEFAULT_RIDGE) -> list[Tensor]:
    """Per head unit, the mean squared error its removal leaves in the attention output per token: [units].

    Direct: trace(W_u C_u W_u^T), W_u the output projection's columns of the unit's heads and C_u the (centred,
    where the projection has a bias to carry the mean) second moment of their context. With `rebuilt`, the
    error is after a least-squares refit from the heads kept (as compensate_heads refits), and a unit's score is
    its step on the layer's removal path (linalg.removal_path): the error of removing it with the units removed
    before it, less the error before it (made non-decreasing along the path, so a plan removes a layer's units in
    the path's order). The first k steps add up to at least the error of removing those k units together, so the last heads
    of a layer, which the others cannot rebuild once they are gone too, carry what the layer does."""
    base = base_model(model)
    errs = []
    for site, g in zip(attention_sites(model), heads.gram):
        o = get_module(base, site.o)
        w = weight_out_in(o).detach().double().cpu()                          # [d_model, heads*head_dim]
        m2 = second_moment(g, centred=getattr(o, "bias", None) is not None)  # [heads*head_dim, heads*head_dim]
        blocks = [site.q_features([u]) for u in range(site.n_units)]
        if rebuilt and site.n_units > 1:
            order, path = removal_path(g, w, m2, blocks, ridge)
            steps = torch.tensor(path, dtype=torch.float64).diff(prepend=torch.zeros(1, dtype=torch.float64))
            steps = torch.cummax(steps.clamp(min=0.0), dim=0).values
            out = torch.empty(site.n_units, dtype=torch.float64)
            out[torch.as_tensor(order)] = steps
            errs.append(out.float())
            continue
        out = [quad(w[:, c], m2[c][:, c]) for c in (torch.tensor(cols, dtype=torch.long) for cols in blocks)]
        errs.append(torch.tensor(out, dtype=torch.float32).clamp(min=0.0))
    return errs


def joint_scores(ffn: FFNStats, heads: HeadStats, model, score: str = "fisher", beta: float = DEFAULT_BETA,
                 rebuilt: bool = True, ridge: float = DEFAULT_RIDGE, head_rebuilt: bool = True,
                 neuron_path: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Scores of FFN neurons and attention head units on one scale, so one ranking (or one budget) covers
    both: Fisher information of each unit's mask (loss units for both kinds) divided by its mean over all
    units, plus beta x the error its removal leaves divided by that error's mean over all units. The heads' error
    is after a refit from the other heads, like the neurons' (`rebuilt`), unless head_rebuilt=False (the direct
    error, this scorer's rule before issue 25)."""
    f_n = _sensitivity(ffn, score)
    f_h = _sensitivity(heads, score)
    f_mean = torch.cat(f_n + f_h).mean().clamp(min=1e-30)
    neurons, units = [f / f_mean for f in f_n], [f / f_mean for f in f_h]
    if beta > 0:
        e_n = removal_error(model, ffn, rebuilt, ridge, neuron_path)
        e_h = head_removal_error(model, heads, rebuilt and head_rebuilt, ridge)
        e_mean = torch.cat(e_n + e_h).mean().clamp(min=1e-30)
        neurons = [s + beta * e / e_mean for s, e in zip(neurons, e_n)]
        units = [s + beta * e / e_mean for s, e in zip(units, e_h)]
    return neurons, units


@dataclass(frozen=True)
class CalibratedOptions:
    """The calibrated scorer's options: the sensitivity (fisher | taylor), beta x the removal error (after a
    refit when `rebuilt`; for head units, when `head_rebuilt` too), the ridge of that error term, and whether
    attention head units are scored too."""

    score: str = "fisher"
    beta: float = DEFAULT_BETA
    rebuilt: bool = True
    ridge: float = DEFAULT_RIDGE   # scoring only (the removal error's fit); a request passes its refit's ridge
    heads: bool = False
    head_rebuilt: bool = True
    neuron_path: bool | None = None   # None: see neuron_path_default

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", finite(self.beta, "beta", 0.0))
        object.__setattr__(self, "ridge", finite(self.ridge, "ridge", 0.0))
        flag(self.head_rebuilt, "head_rebuilt")
        optional(flag, self.neuron_path, "neuron_path")


@register("calibrated", "Fisher sensitivity of each neuron on the calibration set plus the error its removal "
          "leaves after compensation; by default per-layer budgets from one global ranking with a floor per "
          "layer, and least-squares compensation folded into the down projection (prune applies it)",
          options=CalibratedOptions)
def calibrated_scores(calib: Calibration, sparsity: float, opts: CalibratedOptions = CalibratedOptions()) -> Scores:
    """Scores of every FFN neuron; heads=True also scores the attention head units on the neurons' scale
    (joint_scores), for a cost target or a head sparsity."""
    score, beta, rebuilt, ridge, heads = opts.score, opts.beta, opts.rebuilt, opts.ridge, bool(opts.heads)
    path = neuron_path_default(calib.loaded.kind, heads) if opts.neuron_path is None else opts.neuron_path
    collected = calibration_pass(calib, grads=True, heads=heads)
    stats = collected.ffn

    def compute() -> tuple[list[Tensor], list[Tensor] | None]:
        if heads:
            return joint_scores(stats, collected.heads, calib.loaded.model, score, beta, rebuilt, ridge,
                                opts.head_rebuilt, path)
        return sensitivity_scores(stats, score, beta, calib.loaded.model, rebuilt, ridge, path), None

    # cached like the statistics: every target or sparsity of a sweep on one sample reuses the removal paths
    values, head_values = calib.cached(("calibrated", score, beta, rebuilt, ridge, heads, opts.head_rebuilt, path),
                                       compute)
    params = dict(score=score, beta=beta, rebuilt=rebuilt, calib_inputs=stats.n_examples, calib_tokens=stats.n_tokens,
                  calib_max_length=stats.info.get("max_length"))
    if heads:
        params["head_rebuilt"] = opts.head_rebuilt
    if path:
        params["neuron_path"] = True
    return Scores(list(values), params, seed=calib.seed, head_values=None if head_values is None else list(head_values))

