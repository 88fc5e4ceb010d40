"""Model surgery: rebuild projection modules with fewer rows or columns, so an FFN (and, for attention, a set
of heads) becomes physically smaller. Linear and GPT-2's Conv1D alike, dtype and device kept, weights
contiguous (strided weights make the matrix multiplies slower). Plans and methods live in later stages;
this module only takes lists of ids to keep.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .families import Conv1D, base_model, family_of, ffn_sites, ffn_widths, get_module, set_module, weight_out_in


class SafeConv1D(Conv1D if Conv1D else nn.Module):  # type: ignore[misc]
    """GPT-2's Conv1D that also works with zero inputs or outputs (a layer whose neurons are all removed)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.numel() == 0:
            return self.bias.expand(*x.shape[:-1], self.nf).clone() if self.bias is not None else x.new_zeros(
                *x.shape[:-1], self.nf)
        return super().forward(x)


def make_projection(like: nn.Module, weight_out_in_: Tensor, bias: Tensor | None) -> nn.Module:
    """A module of `like`'s type holding the given [out, in] weight (Conv1D stores it as [in, out])."""
    out_f, in_f = weight_out_in_.shape
    if isinstance(like, nn.Linear):
        new = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight_out_in_.contiguous(), requires_grad=like.weight.requires_grad)
    elif Conv1D and isinstance(like, Conv1D):
        new = SafeConv1D.__new__(SafeConv1D)
        nn.Module.__init__(new)
        new.nf, new.nx = out_f, in_f
        new.weight = nn.Parameter(weight_out_in_.t().contiguous(), requires_grad=like.weight.requires_grad)
    else:
        raise TypeError(f"unsupported projection module {type(like).__name__}")
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=like.bias.requires_grad)
    return new


def slice_out(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep output features idx of a projection (its rows, and their bias entries)."""
    w = weight_out_in(mod).detach()[idx]
    b = mod.bias.detach()[idx] if getattr(mod, "bias", None) is not None else None
    return make_projection(mod, w, b)


def slice_in(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep input features idx of a projection (its columns; its bias is untouched)."""
    w = weight_out_in(mod).detach()[:, idx]
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return make_projection(mod, w, b)


def set_config_widths(model: nn.Module, widths: Sequence[int]) -> None:
    """Record per-layer FFN widths in the config; a uniform width also sets the family's own field, so
    plain transformers can load such a model."""
    cfg = base_model(model).config
    cfg.anatomy_prune_ffn_widths = list(widths)
    if len(set(widths)) == 1:
        fam = family_of(model).name
        field = {"gpt2": "n_inner", "distilbert": "hidden_dim"}.get(fam, "intermediate_size")
        setattr(cfg, field, int(widths[0]))


def keep_ffn_neurons(model: nn.Module, keep: Sequence[Sequence[int]]) -> nn.Module:
    """Keep only the listed neurons of each layer's FFN, in place (keep[layer] = sorted ids); returns it."""
    base = base_model(model)
    sites = ffn_sites(model)
    if len(keep) != len(sites):
        raise ValueError(f"{len(keep)} layers of neuron ids for a model with {len(sites)} layers")
    for site in sites:
        dev = weight_out_in(get_module(base, site.down)).device
        idx = torch.as_tensor(list(keep[site.layer]), dtype=torch.long, device=dev)
        for path in site.up:
            set_module(base, path, slice_out(get_module(base, path), idx))
        set_module(base, site.down, slice_in(get_module(base, site.down), idx))
    set_config_widths(model, [len(k) for k in keep])
    return model


def resize_ffn(model: nn.Module, widths: Sequence[int]) -> nn.Module:
    """Give each layer's FFN the given width (its first neurons), before a state dict is loaded into it."""
    full = ffn_widths(model)
    if len(widths) != len(full) or any(not 0 <= w <= f for w, f in zip(widths, full)):
        raise ValueError(f"widths {list(widths)[:4]}... do not fit the model's FFN widths {full[:4]}...")
    return keep_ffn_neurons(model, [range(w) for w in widths])
