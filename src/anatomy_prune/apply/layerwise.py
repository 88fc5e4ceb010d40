"""One block at a time: fold a least-squares compensation into one layer's down projection, and slice one
block's FFN physically. The all-at-once versions (`apply.compensate.compensate`, `apply.modes.physical`)
take a whole-model plan and statistics of every layer; a layer-wise pass (pipeline.layerwise) has only the
block in hand and its Gram matrix, so these do the same for one layer (the same fit, `fit_removed`, and the
same slicing primitives, `models.surgery.slice_out` / `slice_in`), keeping the memory to that layer's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.families import base_model, ffn_sites, get_module, set_module, weight_out_in
from ..models.surgery import make_projection, slice_in, slice_out
from ..scores.calibration import DEFAULT_RIDGE
from .compensate import fit_removed


def _quad(w: Tensor, m: Tensor, rows: int = 512) -> float:
    """trace(w m w^T) for w [out, n], m [n, n], `rows` rows of w at a time (no [out, n] temporaries)."""
    return float(sum(((w[r:r + rows] @ m) * w[r:r + rows]).sum() for r in range(0, w.shape[0], rows)))


@torch.no_grad()
def compensate_layer(down: nn.Module, gram: Tensor, keep: list[int], removed: list[int], *,
                     ridge: float = DEFAULT_RIDGE, intercept: bool | None = None, layer: int | None = None,
                     inplace: bool = True) -> tuple[dict, Tensor, Tensor | None]:
    """The ridge least-squares reconstruction of the `removed` neurons from the `keep` ones, folded into the
    kept columns of `down` (and its bias), as `apply.compensate.compensate` does for each layer.

    gram: [d_ff+1, d_ff+1] float64 Gram of [h; 1] over the calibration tokens. intercept=None fits the constant
    only where `down` has a bias. Returns the layer's diagnostics (the relative reconstruction error of the FFN
    output on the calibration tokens with plain removal and after compensation, never larger), the compensated
    kept columns [d_model, |K|] and bias (down's dtype and device), which `inplace` also writes into `down`
    (without it `down` is not touched: a weight that maps a checkpoint file then stays clean)."""
    g = gram.detach().double().cpu()
    d = g.shape[0] - 1
    w_view = weight_out_in(down)                                          # [d_model, d_ff] (a view)
    bias = getattr(down, "bias", None)
    use_c = (bias is not None) if intercept is None else (bool(intercept) and bias is not None)
    entry = {"layer": layer, "kept": len(keep), "removed": len(removed), "intercept": use_c}
    kept_cols = torch.tensor(list(keep), dtype=torch.long)
    if not removed:
        entry.update(rel_err_removed=0.0, rel_err_compensated=0.0, ridge=0.0, ill_posed=False)
        return entry, w_view.detach()[:, kept_cols.to(w_view.device)], None if bias is None else bias.detach()
    coef, info = fit_removed(g, keep, removed, intercept=use_c, ridge=ridge, layer=layer)  # [|K| (+1), |R|]
    w = w_view.detach().double().cpu()                                    # [d_model, d_ff]
    b = bias.detach().double().cpu() if bias is not None else None
    total = _quad(w, g[:-1, :-1])                                         # sum over tokens of ||W h + b||^2
    if b is not None:
        total += 2 * float(b @ (w @ g[:-1, -1])) + float(g[-1, -1]) * float(b @ b)
    cols = list(keep) + ([d] if use_c else [])
    kidx, ridx = torch.tensor(cols, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
    w_r = w.index_select(1, ridx)                                         # [d_model, |R|]
    g_r = g.index_select(0, ridx)                                         # [|R|, d_ff+1]
    before = _quad(w_r, g_r.index_select(1, ridx))
    g_kr = g_r.index_select(1, kidx).t()                                  # [|K| (+1), |R|]
    del g_r
    delta = w_r @ coef.t()                                                # [d_model, |K| (+1)]
    after = before - 2 * float(((delta @ g_kr) * w_r).sum()) + _quad(delta, g.index_select(0, kidx).index_select(1, kidx))
    del g_kr
    new_kept = (w.index_select(1, kept_cols) + delta[:, : len(keep)]).to(w_view.dtype).to(w_view.device)
    new_bias = None if bias is None else bias.detach().clone()
    if use_c:
        new_bias += delta[:, -1].to(bias.dtype).to(bias.device)
    if inplace:
        w_view[:, kept_cols.to(w_view.device)] = new_kept                  # [d_model, |K|]
        if use_c:
            bias.copy_(new_bias)
    entry.update(rel_err_removed=before / max(total, 1e-30), rel_err_compensated=after / max(total, 1e-30), **info)
    return entry, new_kept, new_bias


def slice_block_ffn(model: nn.Module, layer: int, keep: list[int], down_weight: Tensor | None = None,
                    down_bias: Tensor | None = None) -> None:
    """Keep only the listed neurons of block `layer`'s FFN, in place (models.surgery.keep_ffn_neurons for one
    block; the config's widths are the caller's to set once every block is done). down_weight [d_model, |K|]
    (and down_bias): the kept columns of the down projection as compensate_layer made them, used instead of
    slicing the old ones."""
    base = base_model(model)
    site = ffn_sites(model)[layer]
    down = get_module(base, site.down)
    dev = weight_out_in(down).device
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=dev)
    for path in site.up:
        set_module(base, path, slice_out(get_module(base, path), idx))
    if down_weight is None:
        set_module(base, site.down, slice_in(down, idx))
    else:
        if tuple(down_weight.shape) != (weight_out_in(down).shape[0], len(keep)):
            raise ValueError(f"block {layer}: a down weight of shape {tuple(down_weight.shape)} for {len(keep)} neurons")
        bias = down_bias if down_bias is not None else (down.bias.detach() if getattr(down, "bias", None) is not None
                                                        else None)
        set_module(base, site.down, make_projection(down, down_weight.detach().contiguous(), bias))
