"""Compensation: rebuild what removed FFN neurons contributed from the neurons that stay, without retraining.

For each layer, the removed neurons' activations h_R are regressed on the kept ones and a constant,
h_R ~ A h_K + c, by ridge-regularised least squares over the calibration tokens, and the fit is folded into
the down projection of the UNPRUNED model:  W_K <- W_K + W_R A,  b <- b + W_R c.  After `apply.physical`
slices the removed neurons away, the model is a plain dense model that is simply smaller.

Everything the fit needs is a per-layer sufficient statistic, the Gram matrix of [h; 1] over non-padding
tokens, collected in one pass by `scores.calibration.ffn_input_stats` (raw activations are never kept).
The idea of refitting what stays by least squares so that the layer output is kept is ThiNet's (Luo et al.
2017) and ZipLM's (Kurtic et al. 2023); FLAP (An et al. 2024) compensates the mean with a bias.

Because the least-squares fit is the same in activation space and in output space (the target W_R h_R is
linear in h_R), the output-space reconstruction error can only fall: the ridge solution is never worse on
the calibration tokens than plain removal (A = 0, c = 0).

Down projections without a bias (Llama-like families) get the best fit WITHOUT the constant column, so
only the linear part is folded in and the saved model keeps the family's own layout (plain transformers
loads it); the mean shift c that a bias would carry is lost, which the diagnostics show.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.families import attention_sites, base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from ..plan.plan import PruningPlan
from ..scores.calibration import DEFAULT_RIDGE, FFNStats

log = logging.getLogger(__name__)

ILL_POSED_RIDGE = 1e-1   # at least this when there are fewer calibration tokens than unknowns per output


# --- the least-squares fit ------------------------------------------------------------------------

def check_recipe(ridge, readout_mix) -> tuple[float, float]:
    """A compensation recipe's numbers, checked (they may come from a plan file)."""
    try:
        r, m = float(ridge), float(readout_mix)
    except (TypeError, ValueError):
        raise UserError(f"compensation needs a number for ridge and readout_mix; got {ridge!r} and "
                        f"{readout_mix!r}") from None
    if isinstance(ridge, bool) or isinstance(readout_mix, bool) or not (0.0 <= r < 1e6) or not 0.0 <= m <= 1.0:
        raise UserError(f"ridge must be in [0, 1e6) and readout_mix in [0, 1]; got {ridge!r} and {readout_mix!r}")
    return r, m


def _check_stats(model: nn.Module, stats: FFNStats) -> None:
    widths = ffn_widths(model)
    if stats.widths != widths:
        raise UserError(f"calibration statistics are for FFN widths {stats.widths[:4]}... but the model has "
                        f"{widths[:4]}...; collect them on the unpruned model the plan was made for")


def fit_removed(gram: Tensor, keep: list[int], removed: list[int], *, intercept: bool = True,
                ridge: float = DEFAULT_RIDGE, layer: int | None = None,
                n_samples: float | None = None) -> tuple[Tensor, dict]:
    """Ridge least squares of the removed neurons on the kept ones (and a constant when `intercept`).

    gram: [d_ff+1, d_ff+1] float64 Gram of [h; 1]. Returns B: [|K| (+1), |R|] with h_R ~ B^T [h_K; 1],
    and what was done (ridge actually used, whether the fit was ill-posed). The constant column is not
    penalised; the ridge is `ridge` times the mean diagonal of the kept block. n_samples: how many
    tokens the Gram sums over, when it is not gram[-1, -1] (a reweighted Gram).
    """
    d = gram.shape[0] - 1
    n_tok = float(gram[-1, -1]) if n_samples is None else float(n_samples)
    cols = list(keep) + ([d] if intercept else [])
    where = f"layer {layer}: " if layer is not None else ""
    info = {"ill_posed": False, "ridge": float(ridge)}
    if not removed or not cols:
        return gram.new_zeros(len(cols), len(removed)), info
    kidx = torch.tensor(cols, dtype=torch.long)
    ridx = torch.tensor(removed, dtype=torch.long)
    a = gram[kidx][:, kidx]                                    # [|K|+1, |K|+1]
    rhs = gram[kidx][:, ridx]                                  # [|K|+1, |R|]
    n_unknown = len(cols)
    if n_tok < n_unknown:
        info["ill_posed"] = True
        if ridge < ILL_POSED_RIDGE:
            log.warning("%sonly %d calibration tokens for %d unknowns per removed neuron: the fit is "
                        "ill-posed; regularising with ridge %.3g (use more or longer calibration texts)",
                        where, int(n_tok), n_unknown, ILL_POSED_RIDGE)
            ridge = ILL_POSED_RIDGE
    pen = torch.ones(len(cols), dtype=gram.dtype)
    if intercept:
        pen[-1] = 0.0                                          # the constant column is not penalised
    scale = float(torch.diagonal(a)[: len(keep)].mean().clamp(min=1e-12)) if keep else 1.0
    for attempt in range(8):
        chol, bad = torch.linalg.cholesky_ex(a + torch.diag(ridge * scale * pen))
        if bad == 0:
            break
        new = ridge * 10 if ridge > 0 else 1e-8
        if attempt == 0:
            log.warning("%sthe kept neurons' Gram matrix is singular (dead or duplicate neurons, or too few "
                        "tokens); regularising more (ridge %.3g -> %.3g)", where, ridge, new)
        info["ill_posed"] = True
        ridge = new
    else:
        raise UserError(f"{where}could not fit the compensation even with strong regularisation; "
                        "check the calibration data (is it empty or constant?)")
    info["ridge"] = float(ridge)
    return torch.cholesky_solve(rhs, chol), info


def _quad(w: Tensor, m: Tensor) -> float:
    """trace(w m w^T) for w [out, n], m [n, n]."""
    return float(((w @ m) * w).sum())


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
def refit_projection(proj: nn.Module, g: Tensor, keep: list[int], removed: list[int], *, ridge: float,
                     intercept: bool | None, n_samples: float, layer: int) -> dict:
    """Fold the least-squares reconstruction of a projection's removed inputs (from its kept inputs and a
    constant, the Gram `g` of [x; 1] over the calibration tokens) into its kept input columns and its bias,
    in place. The FFN's down projection (inputs = neurons) and the attention's output projection (inputs =
    the heads' context features) are refitted alike. Returns the layer's diagnostics."""
    w_view = weight_out_in(proj)                                          # [d_out, d_in] (a view)
    bias = getattr(proj, "bias", None)
    has_bias = bias is not None
    use_c = has_bias if intercept is None else (intercept and has_bias)
    d = g.shape[0] - 1
    w = w_view.detach().double().cpu()
    b = bias.detach().double().cpu() if has_bias else torch.zeros(w.shape[0], dtype=torch.float64)
    wz = torch.cat([w, b[:, None]], dim=1)                                 # [d_out, d_in+1]
    total = _quad(wz, g)
    entry = {"layer": layer, "kept": len(keep), "removed": len(removed), "intercept": use_c}
    if not removed:
        entry.update(rel_err_removed=0.0, rel_err_compensated=0.0, ridge=0.0, ill_posed=False)
        return entry
    coef, info = fit_removed(g, keep, removed, intercept=use_c, ridge=ridge, layer=layer, n_samples=n_samples)
    cols = list(keep) + ([d] if use_c else [])
    kidx, ridx = torch.tensor(cols, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
    w_r = w[:, ridx]                                                      # [d_out, |R|]
    g_rr, g_kr, g_kk = g[ridx][:, ridx], g[kidx][:, ridx], g[kidx][:, kidx]
    before = _quad(w_r, g_rr)
    delta = w_r @ coef.t()                                                # [d_out, |K| (+1)]
    # sum over tokens of ||W_R x_R - delta z_K||^2, expanded in Gram blocks
    after = before - 2 * float(((delta @ g_kr) * w_r).sum()) + _quad(delta, g_kk)
    if keep:
        new_w = w.clone()
        new_w[:, keep] += delta[:, : len(keep)]
        w_view[:, torch.tensor(keep, dtype=torch.long, device=w_view.device)] = new_w[:, keep].to(
            w_view.dtype).to(w_view.device)
    if use_c:
        bias += delta[:, -1].to(bias.dtype).to(bias.device)
    entry.update(rel_err_removed=before / max(total, 1e-30), rel_err_compensated=after / max(total, 1e-30), **info)
    return entry


@torch.no_grad()
def compensate_heads(model: nn.Module, plan: PruningPlan, stats: FFNStats, ridge: float = DEFAULT_RIDGE) -> dict:
    """The same least-squares refit for attention heads: each layer's removed heads' context features are
    rebuilt from the kept heads' (and a constant carried by the output projection's bias, where it has one)
    and folded into the output projection, in place, on the UNPRUNED model (Kwon et al.'s layer-wise mask
    tuning, as a closed-form refit). Returns per-layer diagnostics as `compensate` does."""
    if plan.heads is None:
        return {"layers": [], "mean_rel_err_removed": 0.0, "mean_rel_err_compensated": 0.0}
    if stats.head_gram is None:
        raise ValueError("compensating heads needs statistics collected with heads=True")
    base = base_model(model)
    layers = []
    for site in attention_sites(model):
        kept_units = list(plan.heads[site.layer])
        gone = [u for u in range(site.n_units) if u not in set(kept_units)]
        g = stats.head_gram[site.layer]
        layers.append(refit_projection(get_module(base, site.o), g, site.q_features(kept_units), site.q_features(gone),
                                       ridge=ridge, intercept=None, n_samples=float(g[-1, -1]), layer=site.layer))
    mean = lambda k: sum(e[k] for e in layers) / max(1, len(layers))  # noqa: E731
    return {"layers": layers, "mean_rel_err_removed": mean("rel_err_removed"),
            "mean_rel_err_compensated": mean("rel_err_compensated")}


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: FFNStats, ridge: float = DEFAULT_RIDGE,
               intercept: bool | None = None, readout_mix: float = 0.0) -> dict:
    """Fold a least-squares reconstruction of each layer's removed neurons into its kept down-projection
    columns (and its bias), in place, on the UNPRUNED model; then `apply.physical` (or `apply.mask`).

    intercept=None fits the constant column only where the down projection has a bias to carry it.
    ridge and readout_mix (see `layer_gram`) are the recipe's (the `calibrated` scorer gives one); the plan
    is not changed, and compensating a model twice is the caller's mistake to avoid (the pruning step
    always compensates a fresh copy of the unpruned model).
    Returns per-layer diagnostics: relative reconstruction error of the layer output on the calibration
    tokens with plain removal (`rel_err_removed`) and after compensation (`rel_err_compensated`).
    """
    plan.check_fits(model)
    _check_stats(model, stats)
    ridge, readout_mix = check_recipe(ridge, readout_mix)
    base = base_model(model)
    layers = []
    for site in ffn_sites(model):
        g, n_samples = layer_gram(stats, site.layer, readout_mix)             # [d_ff+1, d_ff+1]
        layers.append(refit_projection(get_module(base, site.down), g, list(plan.keep[site.layer]),
                                       plan.removed(site.layer), ridge=ridge, intercept=intercept,
                                       n_samples=n_samples, layer=site.layer))
    mean = lambda k: sum(e[k] for e in layers) / max(1, len(layers))  # noqa: E731
    report = {"layers": layers, "ridge": ridge, "readout_mix": readout_mix, "n_tokens": stats.n_tokens,
              "mean_rel_err_removed": mean("rel_err_removed"),
              "mean_rel_err_compensated": mean("rel_err_compensated"),
              "ill_posed_layers": [e["layer"] for e in layers if e.get("ill_posed")]}
    log.info("compensation: mean relative reconstruction error %.4f -> %.4f over %d layers",
             report["mean_rel_err_removed"], report["mean_rel_err_compensated"], len(layers))
    return report
