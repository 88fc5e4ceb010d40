"""Apply a PruningPlan: mask the neurons (the paper's way) or physically remove them.

mask:      the removed neurons' up rows (and biases) and down columns are zeroed in place; shapes stay, so
           the model saves and loads as a plain transformers model, and it is no faster.
masked():  the same result, reversibly: a hook zeroes the removed neurons' activations while inside.
physical:  the up / gate projections lose their rows (and biases) and the down projection its columns, so
           each layer's FFN is smaller and faster (models.surgery); Linear and GPT-2's Conv1D alike.
The plan is never changed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..hooks import layer_of, run_with_hooks
from ..models.families import base_model, ffn_sites, get_module, weight_out_in
from ..models.surgery import keep_ffn_neurons
from ..plan.plan import PruningPlan

MODES = ("mask", "physical")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


def physical(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the plan's neurons from the model in place; returns the model."""
    plan.check_fits(model)
    return keep_ffn_neurons(model, plan.keep)


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
    keep: dict[int, Tensor] = {}
    for site in ffn_sites(model):
        w = weight_out_in(get_module(base, site.down))
        keep[site.layer] = plan.keep_mask(site.layer, w.device).to(w.dtype)

    def zero_removed(x: Tensor, point: str) -> Tensor:  # x: [batch, pos, d_ff]
        return x * keep[layer_of(point)]

    with run_with_hooks(model, {"ffn.*.hidden": zero_removed}):
        yield model


def apply_plan(model: nn.Module, plan: PruningPlan, mode: str) -> nn.Module:
    """mask() or physical() by name."""
    return (mask if check_mode(mode) == "mask" else physical)(model, plan)
