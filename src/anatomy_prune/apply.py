"""Apply a PruningPlan: mask the neurons (the paper's way) or physically remove them.

mask:      the removed neurons' up rows (and biases) and down columns are zeroed in place; shapes stay, so
           the model saves and loads as a plain transformers model, and it is no faster.
masked():  the same result, reversibly: a hook zeroes the removed neurons' activations while inside.
physical:  the up / gate projections lose their rows (and biases) and the down projection its columns, so
           each layer's FFN is smaller and faster; Linear and GPT-2's Conv1D, dtype and device kept.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .families import (Conv1D, base_model, family_of, ffn_sites, ffn_widths, get_module, set_module,
                       weight_out_in)
from .plan import PruningPlan

MODES = ("mask", "physical")


class _SafeConv1D(Conv1D if Conv1D else nn.Module):  # type: ignore[misc]
    """GPT-2's Conv1D that also works with zero inputs or outputs (a layer whose neurons are all removed)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.numel() == 0:
            return self.bias.expand(*x.shape[:-1], self.nf).clone() if self.bias is not None else x.new_zeros(
                *x.shape[:-1], self.nf)
        return super().forward(x)


def _make_projection(like: nn.Module, weight_out_in_: Tensor, bias: Tensor | None) -> nn.Module:
    """A module of `like`'s type holding the given [out, in] weight (Conv1D stores it as [in, out])."""
    out_f, in_f = weight_out_in_.shape
    if isinstance(like, nn.Linear):
        new = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight_out_in_.contiguous(), requires_grad=like.weight.requires_grad)
    elif Conv1D and isinstance(like, Conv1D):
        new = _SafeConv1D.__new__(_SafeConv1D)
        nn.Module.__init__(new)
        new.nf, new.nx = out_f, in_f
        new.weight = nn.Parameter(weight_out_in_.t().contiguous(), requires_grad=like.weight.requires_grad)
    else:
        raise TypeError(f"unsupported projection module {type(like).__name__}")
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=like.bias.requires_grad)
    return new


def _slice_out(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep output features idx of a d_model -> d_ff projection."""
    w = weight_out_in(mod).detach()[idx]
    b = mod.bias.detach()[idx] if getattr(mod, "bias", None) is not None else None
    return _make_projection(mod, w, b)


def _slice_in(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep input features idx of a d_ff -> d_model projection (its bias is untouched)."""
    w = weight_out_in(mod).detach()[:, idx]
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return _make_projection(mod, w, b)


def set_config_widths(model: nn.Module, widths: list[int]) -> None:
    """Record per-layer FFN widths in the config; a uniform width also sets the family's own field,
    so plain transformers can load such a model."""
    cfg = base_model(model).config
    cfg.anatomy_prune_ffn_widths = list(widths)
    if len(set(widths)) == 1:
        fam = family_of(model).name
        field = {"gpt2": "n_inner", "distilbert": "hidden_dim"}.get(fam, "intermediate_size")
        setattr(cfg, field, widths[0])


def physical(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the plan's neurons from the model in place; returns the model."""
    plan.check_fits(model)
    base = base_model(model)
    for site in ffn_sites(model):
        dev = weight_out_in(get_module(base, site.down)).device
        idx = torch.tensor(plan.keep[site.layer], dtype=torch.long, device=dev)
        for path in site.up:
            set_module(base, path, _slice_out(get_module(base, path), idx))
        set_module(base, site.down, _slice_in(get_module(base, site.down), idx))
    set_config_widths(model, plan.kept_widths)
    return model


def resize_ffn(model: nn.Module, widths: list[int]) -> nn.Module:
    """Give each layer's FFN the given width, with uninitialised weights (before loading a state dict)."""
    return physical(model, PruningPlan(keep=[list(range(w)) for w in widths], widths=ffn_widths(model)))


@torch.no_grad()
def mask(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Zero the plan's removed neurons in place (shapes unchanged); returns the model."""
    plan.check_fits(model)
    base = base_model(model)
    for site in ffn_sites(model):
        gone = torch.tensor(plan.removed(site.layer), dtype=torch.long)
        if gone.numel() == 0:
            continue
        for path in site.up:
            mod = get_module(base, path)
            weight_out_in(mod)[gone.to(mod.weight.device)] = 0  # a view, for Conv1D too
            if getattr(mod, "bias", None) is not None:
                mod.bias[gone.to(mod.bias.device)] = 0
        down = get_module(base, site.down)
        weight_out_in(down)[:, gone.to(down.weight.device)] = 0
    return model


@contextmanager
def masked(model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
    """Inside the block the plan's removed neurons output zero; the hooks are always removed after."""
    plan.check_fits(model)
    base = base_model(model)
    handles = []
    for site in ffn_sites(model):
        down = get_module(base, site.down)
        keep = plan.keep_mask(site.layer, weight_out_in(down).device).to(weight_out_in(down).dtype)

        def hook(_mod, args, keep=keep):
            return (args[0] * keep,) + tuple(args[1:])  # args[0]: [batch, pos, d_ff]

        handles.append(down.register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def apply_plan(model: nn.Module, plan: PruningPlan, mode: str) -> nn.Module:
    if mode == "mask":
        return mask(model, plan)
    if mode == "physical":
        return physical(model, plan)
    raise ValueError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
