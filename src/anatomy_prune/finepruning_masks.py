"""Neuron masks for fine-pruning: per-neuron scores, Top_v selection, the mask hook with straight-through
gradients, and GUM's running uniqueness weights. Used by `finepruning.py`; no training loop here.

A mask is applied the way `apply.masked` does it: a forward pre-hook on each layer's down projection
multiplies the FFN activation h [batch, pos, d_ff] by a 0/1 vector. For the learnable methods the hook
multiplies by `hard + s - s.detach()`: the forward value is the hard mask, and the backward pass gives the
score the mask's gradient unchanged (the straight-through estimator), so

    dL/ds_i = sum_tokens h_i * dL/dh'_i = sum_j W2[j, i] * dL/dW2'[j, i]

i.e. exactly -(-W * dL/dW) summed over neuron i's down-projection column (W2' = W2 diag(mask)). Decision
(notes 3.3): the authors' code also adds the matching sum over the neuron's W1 row, because it masks the
weights rather than the activation; we keep the activation hook of the toolkit and therefore only the
W2-column half. A side effect, stated: a pruned neuron's score still receives the first-order "what if it
were kept" gradient (its h is computed, only its output is cut), so a pruned neuron can come back when its
score rises, as in unstructured movement pruning; in the code a pruned neuron's score gradient is ~0.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .families import base_model, ffn_sites, get_module, weight_out_in

SELECTIONS = ("local", "global")


def keep_count(width: int, keep: float) -> int:
    """Neurons kept out of `width` at keep fraction `keep`: width - round((1 - keep) * width).

    The same rounding as `plan.keep_counts` (local), so the mask at the final step is exactly the plan.
    (The code takes int(v * m), which can keep one neuron fewer.)"""
    return width - int(round((1.0 - keep) * width))


@torch.no_grad()
def top_masks(scores: Sequence[Tensor], keep: float, selection: str = "local") -> list[Tensor]:
    """0/1 masks keeping the highest scores: per layer (local, every layer keeps keep_count(m_l)) or over
    all layers pooled (global, keep_count(N) neurons in all, no per-layer minimum, so a layer can empty).

    Ties are broken by index (stable sort), so exactly the counted number is kept (notes 7.8: `s >= tau`
    in the code can keep a few more)."""
    if selection == "local":
        masks = []
        for s in scores:
            m = torch.zeros_like(s, dtype=torch.float32)
            order = torch.argsort(s.detach().float(), descending=True, stable=True)
            m[order[:keep_count(s.numel(), keep)]] = 1.0
            masks.append(m)
        return masks
    if selection == "global":
        flat = torch.cat([s.detach().float().reshape(-1) for s in scores])  # [N]
        order = torch.argsort(flat, descending=True, stable=True)
        m = torch.zeros_like(flat)
        m[order[:keep_count(flat.numel(), keep)]] = 1.0
        return list(torch.split(m, [s.numel() for s in scores]))
    raise ValueError(f"unknown selection '{selection}'; choose one of {SELECTIONS}")


def down_projections(model: nn.Module) -> list[nn.Module]:
    """Each layer's d_ff -> d_model module, in layer order."""
    base = base_model(model)
    return [get_module(base, s.down) for s in ffn_sites(model)]


@torch.no_grad()
def neuron_norm_scores(model: nn.Module) -> list[Tensor]:
    """Structured magnitude per neuron: ||input rows (all up / gate projections)||_2 x ||output column||_2,
    recomputed from the current weights (same score as methods.magnitude_scores, kept on the device)."""
    base = base_model(model)
    out = []
    for site in ffn_sites(model):
        w_in = torch.cat([weight_out_in(get_module(base, p)) for p in site.up], dim=1)  # [d_ff, k*d_model]
        w_out = weight_out_in(get_module(base, site.down))  # [d_model, d_ff]
        out.append(w_in.float().norm(dim=1) * w_out.float().norm(dim=0))  # [d_ff]
    return out


class NeuronMasks:
    """One 0/1 mask per layer on the down projections' input, optionally with learnable scores (STE).

    `hard[l]` [d_ff_l] is the current mask; `scores[l]` an nn.Parameter [d_ff_l] for movement / GUM, else
    None. While `record` is set, the masked activations of each forward pass (padding rows dropped with
    `token_mask`) are handed to `on_activation(layer, h)` (GUM's similarity statistics).
    """

    def __init__(self, downs: Sequence[nn.Module], widths: Sequence[int], device: torch.device,
                 learnable: bool = False, init: float = 0.0):
        self.downs = list(downs)
        self.hard = [torch.ones(w, device=device) for w in widths]
        self.scores: list[nn.Parameter] | None = (
            [nn.Parameter(torch.full((w,), float(init), device=device)) for w in widths] if learnable else None)
        self.record = False
        self.token_mask: Tensor | None = None   # [batch, pos] 1 for real tokens, set by the trainer
        self.on_activation = None               # callable(layer, h [tokens, d_ff]) or None

    def set(self, masks: Sequence[Tensor]) -> None:
        self.hard = [m.to(h.device, torch.float32) for m, h in zip(masks, self.hard)]

    def factor(self, layer: int) -> Tensor:
        """The multiplier for layer's activation: hard mask, with straight-through gradient to the score."""
        hard = self.hard[layer]
        if self.scores is not None and torch.is_grad_enabled():
            s = self.scores[layer]
            return hard + s - s.detach()  # forward: hard; backward: d/ds = identity
        return hard

    def kept(self) -> list[list[int]]:
        return [torch.nonzero(h > 0).flatten().tolist() for h in self.hard]

    @contextmanager
    def installed(self) -> Iterator["NeuronMasks"]:
        """Hooks on every down projection while inside; always removed after."""
        handles = []
        for layer, down in enumerate(self.downs):
            def hook(_mod, args, layer=layer):
                h = args[0]  # [batch, pos, d_ff]
                out = h * self.factor(layer).to(h.dtype)
                if self.record and self.on_activation is not None:
                    flat = out.detach().flatten(0, -2)  # [batch*pos, d_ff]
                    if self.token_mask is not None and self.token_mask.numel() == flat.shape[0]:
                        flat = flat[self.token_mask.reshape(-1).to(flat.device) > 0]
                    self.on_activation(layer, flat)
                return (out,) + tuple(args[1:])
            handles.append(down.register_forward_pre_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


# --- GUM: running similarity and uniqueness weights (notes 3.5) -----------------------------------

def abs_cosine(gram: Tensor, sq_norms: Tensor, eps: float = 1e-6) -> Tensor:
    """|C| with C_ij = G_ij / (sqrt(n_i n_j) + eps), uncentred, diagonal set to 0: [m, m]."""
    c = (gram / (torch.sqrt(torch.outer(sq_norms, sq_norms)) + eps)).abs()
    c.fill_diagonal_(0.0)
    return c


def uniqueness_weights(gram: Tensor, sq_norms: Tensor, keep: float, lambda_u: float) -> Tensor:
    """omega_i = 1 + lambda_u * u_i, u_i = sum_j |C_ij| / (m * v): [m]. Pruned neurons have zero activation
    columns, so they add nothing to the sum and the divisor m*v makes u_i about the mean |cos| of neuron i
    against the kept neurons of its layer."""
    m = gram.shape[0]
    u = abs_cosine(gram, sq_norms).sum(dim=0) / (m * max(keep, 1e-12))
    return 1.0 + lambda_u * u


class RunningSimilarity:
    """Per layer, the running Gram matrix and squared norms of the masked activations:
    G <- (1 - rho) G + rho H^T H, n <- (1 - rho) n + rho ||H_:,i||^2; the first batch stores rho * H^T H."""

    def __init__(self, widths: Sequence[int], rho: float, device: torch.device):
        self.rho = float(rho)
        self.gram: list[Tensor | None] = [None] * len(widths)
        self.sq: list[Tensor | None] = [None] * len(widths)

    @torch.no_grad()
    def update(self, layer: int, h: Tensor) -> None:
        h = h.float()  # [tokens, d_ff]
        g, n = h.t() @ h, (h * h).sum(dim=0)  # [d_ff, d_ff], [d_ff]
        if self.gram[layer] is None:
            self.gram[layer], self.sq[layer] = self.rho * g, self.rho * n
        else:
            self.gram[layer] = (1 - self.rho) * self.gram[layer] + self.rho * g
            self.sq[layer] = (1 - self.rho) * self.sq[layer] + self.rho * n

    def weights(self, keep: float, lambda_u: float, widths: Sequence[int], device) -> list[Tensor]:
        return [torch.ones(w, device=device) if g is None else uniqueness_weights(g, n, keep, lambda_u).to(device)
                for g, n, w in zip(self.gram, self.sq, widths)]


def gum_regulariser(scores: Sequence[Tensor], omegas: Sequence[Tensor]) -> Tensor:
    """R = sum_l (sum_i sigmoid(s_li) * omega_li / m_l) / (3 L): the code's L1 on sigmoid(scores), which
    divides by all counted modules (one score module and two masked linears per layer), kept so that
    lambda_R means what it meant there."""
    terms = [(torch.sigmoid(s) * w).sum() / s.numel() for s, w in zip(scores, omegas)]
    return torch.stack(terms).sum() / (3 * len(terms))
