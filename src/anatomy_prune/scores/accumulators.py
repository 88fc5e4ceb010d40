"""Accumulators of calibration statistics, one per statistic, each fed by a named hook point
(hooks.run_with_cache) while the calibration batches run: the Gram of [x; 1] over real tokens or over readout
tokens, the activation magnitudes, and the Fisher / Taylor sums of a per-unit mask's per-example gradients.
`Tokens` says which tokens of the batch being run count; the calibration pass sets it before each batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from ..hooks import layer_of, run_with_hooks
from ..linalg import add_gram
from ..models.families import attention_sites, ffn_sites

FFN = "ffn.*.hidden"     # what each FFN's down projection receives: [batch, pos, d_ff]
HEADS = "attn.*.heads"   # what each attention's output projection receives: [batch, pos, heads*head_dim]


@dataclass
class Tokens:
    """Which tokens of the batch being run count: the real (non-padding) ones and each example's readout."""

    mask: Tensor | None = None      # [batch, pos] bool
    readout: Tensor | None = None   # [batch] position of the token a classifier reads out
    count: int = 0                  # real tokens seen so far

    def observe(self, kwargs: dict, _point: str) -> None:
        """A `model.input` hook: take the mask from the forward call's arguments."""
        self.set(kwargs["attention_mask"])

    def set(self, attention_mask: Tensor, readout: Tensor | None = None) -> None:
        self.mask, self.readout = attention_mask.bool(), readout
        self.count += int(self.mask.sum())


@dataclass
class TokenGram:
    """Per point, the Gram of [x; 1] over the real tokens (float32 per batch, float64 sums): [d+1, d+1]."""

    tokens: Tokens

    def __call__(self, total: Tensor | None, x: Tensor, _point: str) -> Tensor:
        return add_gram(total, x[self.tokens.mask.to(x.device)])              # rows: [tokens, d]


@dataclass
class ReadoutGram:
    """Per point, the Gram of [x; 1] over each example's readout token only (classifiers): [d+1, d+1]."""

    tokens: Tokens

    def __call__(self, total: Tensor | None, x: Tensor, _point: str) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        return add_gram(total, x[rows, self.tokens.readout.to(x.device)])     # [batch, d]


@dataclass
class ActivationMagnitude:
    """Per point, one [d] sum of |x| over the real tokens per batch (summed at the end, `total`)."""

    tokens: Tokens

    def __call__(self, sums: list | None, x: Tensor, _point: str) -> list[Tensor]:
        m = self.tokens.mask.to(x.device).to(x.dtype).unsqueeze(-1)          # [batch, pos, 1]
        return (sums or []) + [(x.abs() * m).sum(dim=(0, 1)).float().cpu()]

    @staticmethod
    def total(sums: list[Tensor]) -> Tensor:
        return torch.stack(sums).sum(dim=0)


class MaskGradients:
    """Fisher (sum of squares) and Taylor (sum) over examples of dL/dm for a mask of ones on every unit at
    a hook point: each FFN neuron (FFN), or each head unit, a head or a key/value group (HEADS)."""

    def __init__(self, model: nn.Module, points: str):
        self.model, self.points = model, points
        self.sites = attention_sites(model) if points == HEADS else None
        n = len(self.sites) if self.sites is not None else len(ffn_sites(model))
        self.masks: list[list[Tensor]] = [[] for _ in range(n)]
        self.fisher: list[Tensor | None] = [None] * n    # per layer [units] float64
        self.taylor: list[Tensor | None] = [None] * n

    def _apply(self, x: Tensor, point: str) -> Tensor:
        layer = layer_of(point)
        if self.sites is None:                                                # x: [batch, pos, d_ff]
            m = torch.ones(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
            out = x * m
        else:                                                                 # x: [batch, pos, heads*head_dim]
            u = self.sites[layer].n_units
            m = torch.ones(x.shape[0], u, device=x.device, dtype=x.dtype, requires_grad=True)
            out = (x.view(*x.shape[:2], u, -1) * m[:, None, :, None]).view_as(x)
        self.masks[layer].append(m)
        return out

    @contextmanager
    def masked(self) -> Iterator[list[list[Tensor]]]:
        """Inside, forward passes multiply the units by masks (kept per layer, [batch, ...] each)."""
        with run_with_hooks(self.model, {self.points: self._apply}):
            yield self.masks

    def add_gradients(self) -> None:
        """After a backward: add the masks' per-example gradients to the sums, then forget the masks."""
        for layer, ms in enumerate(self.masks):
            if not ms:
                continue
            g = torch.cat([m.grad.reshape(m.shape[0], -1).float() for m in ms]).double()  # [batch, units]
            f, t = (g * g).sum(0), g.sum(0)
            self.fisher[layer] = f if self.fisher[layer] is None else self.fisher[layer] + f
            self.taylor[layer] = t if self.taylor[layer] is None else self.taylor[layer] + t
            ms.clear()
