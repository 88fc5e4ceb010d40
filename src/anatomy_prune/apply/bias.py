"""Bias compensation (FLAP's, An et al. 2024): what removed FFN neurons or head units contributed on average,
W_R mean(x_R) over the calibration tokens, is folded into the output projection's bias, so only their
fluctuation around the mean is lost. A projection without a bias (Llama's down_proj and o_proj) gets one.
Applied to the UNPRUNED model before slicing, like the least-squares refit (apply.compensate).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..linalg import output_energy, quad, second_moment
from ..models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from ..plan.plan import PruningPlan


@torch.no_grad()
def fold_mean(proj: nn.Module, gram: Tensor, removed: list[int], layer: int | None = None) -> dict:
    """Add W[:, removed] x mean(x[removed]) to `proj`'s bias (creating a zero bias where there is none);
    returns the relative output error of the removal before and after (sums over tokens, from the Gram)."""
    g = gram.detach().double().cpu()
    entry = {"layer": layer, "removed": len(removed)}
    if not removed:
        return {**entry, "rel_err_removed": 0.0, "rel_err_compensated": 0.0}
    w = weight_out_in(proj).detach().double().cpu()                      # [d_out, d_in]
    bias = getattr(proj, "bias", None)
    n = float(g[-1, -1].clamp(min=1.0))
    r = torch.tensor(removed, dtype=torch.long)
    w_r = w.index_select(1, r)                                           # [d_out, |R|]
    delta = w_r @ (g[:-1, -1].index_select(0, r) / n)                    # [d_out]
    total = max(output_energy(w, None if bias is None else bias.detach().double().cpu(), g), 1e-30)
    g_r = torch.cat([r, torch.tensor([g.shape[0] - 1])])
    sub = g.index_select(0, g_r).index_select(1, g_r)                    # Gram of [x_R; 1]
    before = quad(w_r, sub[:-1, :-1])
    after = n * quad(w_r, second_moment(sub, centred=True))
    ref = weight_out_in(proj)
    if bias is None:
        proj.bias = nn.Parameter(delta.to(ref.dtype).to(ref.device), requires_grad=False)
    else:
        bias.add_(delta.to(bias.dtype).to(bias.device))
    return {**entry, "rel_err_removed": before / total, "rel_err_compensated": after / total}


def bias_compensate(model: nn.Module, plan: PruningPlan, stats) -> dict:
    """Fold the mean of every removed FFN neuron (and, where the plan removes heads, head unit) into its
    output projection's bias, in place. stats: a calibration pass (`.ffn`, and `.heads` for a head plan)."""
    plan.check_fits(model)
    base = base_model(model)
    layers = [fold_mean(get_module(base, s.down), stats.ffn.gram[s.layer], plan.removed(s.layer), s.layer)
              for s in ffn_sites(model)]
    heads = []
    if plan.heads is not None:
        for s in attention_sites(model):
            gone = plan.removed_heads(s.layer)
            heads.append(fold_mean(get_module(base, s.o), stats.heads.gram[s.layer], s.q_features(gone), s.layer))
    mean = lambda rows, k: sum(e[k] for e in rows) / max(1, len(rows))  # noqa: E731
    report = {"kind": "bias", "layers": layers, "mean_rel_err_removed": mean(layers, "rel_err_removed"),
              "mean_rel_err_compensated": mean(layers, "rel_err_compensated")}
    if heads:
        report.update(heads_rel_err_removed=mean(heads, "rel_err_removed"),
                      heads_rel_err_compensated=mean(heads, "rel_err_compensated"))
    return report
