"""Compensation: rebuild what removed FFN neurons (or head units) contributed from those that stay.

Per layer, the removed inputs of the down projection (or the attention's output projection) are regressed on
the kept ones and a constant by ridge least squares over the calibration tokens, from the Gram of [x; 1]
alone (`linalg.refit`, shared with the layer-wise path), and the fit is folded into the kept columns and the
bias of the UNPRUNED model: W_K <- W_K + W_R A, b <- b + W_R c; slicing then leaves a smaller dense model.
The output-space error can only fall (the fit is never worse than A = 0). Projections without a bias (Llama)
get the fit without the constant, so the saved model keeps the family's layout. The idea of refitting what
stays is ThiNet's (Luo et al. 2017) and ZipLM's (Kurtic et al. 2023); FLAP (An et al. 2024) refits the mean.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..linalg import DEFAULT_RIDGE, FitSpec, refit
from ..models.families import attention_sites, base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from ..plan.plan import PruningPlan
from ..validate import finite, fraction
from ..scores.calibration import FFNStats, HeadStats

log = logging.getLogger(__name__)


# --- the recipe, the statistics, one projection's refit ---------------------------------------------

def check_recipe(ridge, readout_mix) -> tuple[float, float]:
    """A compensation recipe's numbers, checked (they may come from a plan file)."""
    return finite(ridge, "ridge", 0.0, 1e6), fraction(readout_mix, "readout_mix", closed=True)


def _check_stats(model: nn.Module, stats: FFNStats) -> None:
    widths = ffn_widths(model)
    if stats.widths != widths:
        raise UserError(f"calibration statistics are for FFN widths {stats.widths[:4]}... but the model has "
                        f"{widths[:4]}...; collect them on the unpruned model the plan was made for")


@torch.no_grad()
def layer_gram(stats: FFNStats, layer: int, readout_mix: float = 0.0) -> tuple[Tensor, float]:
    """The Gram a layer's fit uses, and how many tokens it rests on. In the last layer of a classifier only
    the readout token reaches the head, so readout_mix of its weight (0..1) goes to readout tokens."""
    g = stats.gram[layer]
    last = layer == len(stats.gram) - 1
    if not (last and readout_mix > 0 and stats.readout_gram is not None):
        return g, float(g[-1, -1])
    g_ro = stats.readout_gram[layer]
    n_all, n_ro = float(g[-1, -1]), max(1.0, float(g_ro[-1, -1]))
    mixed = (1 - readout_mix) * g + readout_mix * (n_all / n_ro) * g_ro   # per-token means weighted, x n_all
    return mixed, (n_ro if readout_mix >= 1 else n_all)


@torch.no_grad()
def compensate_layer(proj: nn.Module, gram: Tensor, keep: list[int], removed: list[int], spec: FitSpec = FitSpec(),
                     *, layer: int | None = None, inplace: bool = True) -> tuple[dict, Tensor, Tensor | None]:
    """Fold the least-squares rebuild of a projection's removed inputs (linalg.refit on the Gram of [x; 1])
    into its kept columns and its bias: an FFN's down projection, or an attention's output projection.
    The constant is fitted where spec.intercept and there is a bias. Returns the diagnostics, the kept columns
    [d_out, |K|] and the bias; `inplace` also writes them (else `proj` is not touched)."""
    g = gram.detach().double().cpu()
    w_view = weight_out_in(proj)                                          # [d_out, d_in] (a view)
    bias = getattr(proj, "bias", None)
    use_c = bool(spec.intercept) and bias is not None
    kept_cols = torch.tensor(list(keep), dtype=torch.long)
    entry = {"layer": layer, "kept": len(keep), "removed": len(removed), "intercept": use_c}
    if not removed:
        entry.update(rel_err_removed=0.0, rel_err_compensated=0.0, ridge=0.0, ill_posed=False)
        return entry, w_view.detach()[:, kept_cols.to(w_view.device)], None if bias is None else bias.detach()
    w = w_view.detach().double().cpu()
    fit = refit(w, None if bias is None else bias.detach().double().cpu(), g, keep, removed,
                replace(spec, intercept=use_c, where="" if layer is None else f"layer {layer}: "))
    new_kept = (w.index_select(1, kept_cols) + fit.delta[:, : len(keep)]).to(w_view.dtype).to(w_view.device)
    new_bias = None if bias is None else bias.detach().clone()
    if use_c:
        new_bias += fit.delta[:, -1].to(bias.dtype).to(bias.device)
    if inplace:
        w_view[:, kept_cols.to(w_view.device)] = new_kept                  # [d_out, |K|]
        if use_c:
            bias.copy_(new_bias)
    total = max(fit.total, 1e-30)
    entry.update(rel_err_removed=fit.removed_error / total, rel_err_compensated=fit.compensated_error / total,
                 **fit.info)
    return entry, new_kept, new_bias


@torch.no_grad()
def compensate_heads(model: nn.Module, plan: PruningPlan, stats: HeadStats, ridge: float = DEFAULT_RIDGE) -> dict:
    """The same least-squares refit for attention heads: each layer's removed heads' context features are
    rebuilt from the kept heads' (and a constant carried by the output projection's bias, where it has one)
    and folded into the output projection, in place, on the UNPRUNED model (Kwon et al.'s layer-wise mask
    tuning, as a closed-form refit). Returns per-layer diagnostics as `compensate` does."""
    if plan.heads is None:
        return {"layers": [], "mean_rel_err_removed": 0.0, "mean_rel_err_compensated": 0.0}
    base = base_model(model)
    layers = []
    for site in attention_sites(model):
        kept_units = list(plan.heads[site.layer])
        gone = [u for u in range(site.n_units) if u not in set(kept_units)]
        g = stats.gram[site.layer]
        layers.append(compensate_layer(get_module(base, site.o), g, site.q_features(kept_units),
                                       site.q_features(gone), FitSpec(ridge=ridge), layer=site.layer)[0])
    mean = lambda k: sum(e[k] for e in layers) / max(1, len(layers))  # noqa: E731
    return {"layers": layers, "mean_rel_err_removed": mean("rel_err_removed"),
            "mean_rel_err_compensated": mean("rel_err_compensated")}


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: FFNStats, ridge: float = DEFAULT_RIDGE,
               intercept: bool | None = None, readout_mix: float = 0.0) -> dict:
    """Fold a least-squares rebuild of each layer's removed neurons into its kept down-projection columns (and
    bias), in place, on the UNPRUNED model (then `apply.physical`); the plan is not changed. intercept=None
    fits the constant where there is a bias; ridge and readout_mix (`layer_gram`) are the recipe's. Returns
    per-layer diagnostics: the relative reconstruction error with plain removal and after compensation."""
    plan.check_fits(model)
    _check_stats(model, stats)
    ridge, readout_mix = check_recipe(ridge, readout_mix)
    base = base_model(model)
    layers = []
    for site in ffn_sites(model):
        g, n_samples = layer_gram(stats, site.layer, readout_mix)             # [d_ff+1, d_ff+1]
        fit = FitSpec(intercept=intercept is None or bool(intercept), ridge=ridge, n_samples=n_samples)
        layers.append(compensate_layer(get_module(base, site.down), g, list(plan.keep[site.layer]),
                                       plan.removed(site.layer), fit, layer=site.layer)[0])
    mean = lambda k: sum(e[k] for e in layers) / max(1, len(layers))  # noqa: E731
    report = {"layers": layers, "ridge": ridge, "readout_mix": readout_mix, "n_tokens": stats.n_tokens,
              "mean_rel_err_removed": mean("rel_err_removed"),
              "mean_rel_err_compensated": mean("rel_err_compensated"),
              "ill_posed_layers": [e["layer"] for e in layers if e.get("ill_posed")]}
    log.info("compensation: mean relative reconstruction error %.4f -> %.4f over %d layers",
             report["mean_rel_err_removed"], report["mean_rel_err_compensated"], len(layers))
    return report
