"""Neuron masks for fine-pruning: per-neuron scores, Top_v selection, the mask hook with straight-through
gradients, and GUM's running uniqueness weights. Used by `finepruning.train`; no training loop here.

A mask is applied the way `apply.masked` does it: a forward pre-hook on each layer's down projection
multiplies the FFN activation h [batch, pos, d_ff] by a 0/1 vector. For the learnable methods the hook
multiplies by `hard + s - s.detach()`: the forward value is the hard mask, and the backward pass gives the
score the mask's gradient unchanged (the straight-through estimator), so

    dL/ds_i = sum_tokens h_i * dL/dh'_i = sum_j W2[j, i] * dL/dW2'[j, i]

i.e. exactly -(-W * dL/dW) summed over neuron i's down-projection column (W2' = W2 diag(mask)). Decision
(docs/finepruning.md §3.3): the authors' code also adds the matching sum over the neuron's W1 row, because it masks the
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

from ..hooks import layer_of, run_with_hooks
from ..plan.allocate import keep_counts

SELECTIONS = ("local", "global")


@torch.no_grad()
def top_masks(scores: Sequence[Tensor], keep: float, selection: str = "local") -> list[Tensor]:
    """0/1 masks keeping the highest scores, on the scores' device. How many each layer keeps comes from the
    toolkit's one allocator (plan.allocate.keep_counts): local (every layer keeps the same fraction) or
    global (one ranking of the raw scores over all layers, no floor, so a layer can empty). Ties are broken
    by index, so exactly the counted number is kept (docs/finepruning.md §7.8; `s >= tau` in the code can keep a few more)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection '{selection}'; choose one of {SELECTIONS}")
    kind = {"local": {"kind": "local"}, "global": {"kind": "global", "normalize": "none"}}[selection]
    counts = keep_counts([s.detach() for s in scores], 1.0 - keep, kind) if keep < 1 else [s.numel() for s in scores]
    masks = []
    for s, n in zip(scores, counts):
        m = torch.zeros_like(s, dtype=torch.float32)
        m[torch.argsort(s.detach().float(), descending=True, stable=True)[:n]] = 1.0
        masks.append(m)
    return masks


class NeuronMasks:
    """One 0/1 mask per layer on the down projections' input, optionally with learnable scores (STE).

    `hard[l]` [d_ff_l] is the current mask; `scores[l]` an nn.Parameter [d_ff_l] for movement / GUM, else
    None. While `record` is set, the masked activations of each forward pass (padding rows dropped with
    `token_mask`) are handed to `on_activation(layer, h)` (GUM's similarity statistics).
    """

    def __init__(self, model: nn.Module, widths: Sequence[int], device: torch.device,
                 learnable: bool = False, init: float = 0.0):
        self.model = model
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
        """The mask on every FFN hidden activation while inside; always removed after."""
        def hook(h: Tensor, point: str) -> Tensor:  # h: [batch, pos, d_ff]
            layer = layer_of(point)
            out = h * self.factor(layer).to(h.dtype)
            if self.record and self.on_activation is not None:
                flat = out.detach().flatten(0, -2)  # [batch*pos, d_ff]
                if self.token_mask is not None and self.token_mask.numel() == flat.shape[0]:
                    flat = flat[self.token_mask.reshape(-1).to(flat.device) > 0]
                self.on_activation(layer, flat)
            return out

        with run_with_hooks(self.model, {"ffn.*.hidden": hook}):
            yield self


# --- GUM: running similarity and uniqueness weights (docs/finepruning.md §3.5) -----------------------------------

def abs_cosine(gram: Tensor, sq_norms: Tensor, eps: float = 1e-6) -> Tensor:
    """|C| with C_ij = G_ij / (sqrt(n_i n_j) + eps), uncentred, diagonal set to 0: [m, m]."""
    c = torch.outer(sq_norms, sq_norms).sqrt_().add_(eps)   # one [m, m] buffer, in place (m = 3,072 for GPT-2)
    c = torch.div(gram, c, out=c).abs_()
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
            self.gram[layer], self.sq[layer] = g.mul_(self.rho), n.mul_(self.rho)
        else:  # in place, the same operations in the same order (so the same bits) without [d_ff, d_ff] temporaries
            self.gram[layer].mul_(1 - self.rho).add_(g.mul_(self.rho))
            self.sq[layer].mul_(1 - self.rho).add_(n.mul_(self.rho))

    def weights(self, keep: float, lambda_u: float, widths: Sequence[int], device) -> list[Tensor]:
        return [torch.ones(w, device=device) if g is None else uniqueness_weights(g, n, keep, lambda_u).to(device)
                for g, n, w in zip(self.gram, self.sq, widths)]


def gum_regulariser(scores: Sequence[Tensor], omegas: Sequence[Tensor]) -> Tensor:
    """R = sum_l (sum_i sigmoid(s_li) * omega_li / m_l) / (3 L): the code's L1 on sigmoid(scores), which
    divides by all counted modules (one score module and two masked linears per layer), kept so that
    lambda_R means what it meant there."""
    terms = [(torch.sigmoid(s) * w).sum() / s.numel() for s, w in zip(scores, omegas)]
    return torch.stack(terms).sum() / (3 * len(terms))
