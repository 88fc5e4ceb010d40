"""Apply a PruningPlan: mask the neurons (the paper's way) or physically remove them; the same for the
plan's attention head units, if it has any (a plan without heads leaves attention as it is).

mask:      the removed neurons' up rows (and biases) and down columns are zeroed in place; a removed head
           unit's value rows (and biases) and its query heads' output-projection columns likewise. Shapes
           stay, so the model saves and loads as a plain transformers model, and it is no faster.
masked():  the same result, reversibly: hooks zero the removed neurons' activations and the removed heads'
           context (the output projection's input, `attn.{i}.heads`) while inside.
physical:  the up / gate projections lose their rows (and biases) and the down projection its columns, so
           each layer's FFN is smaller and faster; q / k / v lose the removed heads' rows and o their
           columns (models.surgery.keep_heads); Linear and GPT-2's Conv1D alike.
The plan is never changed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..hooks import layer_of, run_with_hooks
from ..models.families import attention_sites, base_model, ffn_sites, get_module, weight_out_in
from ..models.surgery import keep_ffn_neurons, keep_heads
from ..plan.plan import PruningPlan

MODES = ("mask", "physical")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


def physical(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove the plan's neurons from the model in place; returns the model."""
    plan.check_fits(model)
    keep_ffn_neurons(model, plan.keep)
    if plan.heads is not None:
        keep_heads(model, plan.heads)
    return model


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
    if plan.heads is not None:
        _mask_heads(model, plan)
    return model


def _mask_heads(model: nn.Module, plan: PruningPlan) -> None:
    """Zero the removed head units' value rows (and biases) and their query heads' o columns, in place: zero o
    columns make what a head adds exactly zero, as physical removal does (zero query / key rows would not:
    the softmax of zero scores is uniform and the head would still add the mean of its values)."""
    base = base_model(model)
    for site in attention_sites(model):
        gone = plan.removed_heads(site.layer)
        if not gone:
            continue
        o = get_module(base, site.o)
        qf = torch.tensor(site.q_features(gone), dtype=torch.long, device=o.weight.device)
        vf = torch.tensor(site.kv_features(gone), dtype=torch.long, device=o.weight.device)
        if site.fused:  # GPT-2's c_attn: q | k | v, each n_heads * head_dim wide
            vf = vf + 2 * site.n_heads * site.head_dim
        v = get_module(base, site.v)
        weight_out_in(v)[vf] = 0  # a view, for Conv1D too
        if getattr(v, "bias", None) is not None:
            v.bias[vf] = 0
        weight_out_in(o)[:, qf] = 0


@contextmanager
def masked(model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
    """Inside the block the plan's removed neurons (and head units) output zero; the hooks are always removed
    after."""
    plan.check_fits(model)
    base = base_model(model)
    keep: dict[int, Tensor] = {}
    for site in ffn_sites(model):
        w = weight_out_in(get_module(base, site.down))
        keep[site.layer] = plan.keep_mask(site.layer, w.device).to(w.dtype)

    def zero_removed(x: Tensor, point: str) -> Tensor:  # x: [batch, pos, d_ff]
        return x * keep[layer_of(point)]

    hooks = {"ffn.*.hidden": zero_removed}
    if plan.heads is not None:
        heads: dict[int, Tensor] = {}
        for site in attention_sites(model):
            w = weight_out_in(get_module(base, site.o))
            # per unit -> per feature of the context: unit u owns group * head_dim consecutive features
            unit = plan.head_keep_mask(site.layer, w.device).to(w.dtype)
            heads[site.layer] = unit.repeat_interleave(site.group * site.head_dim)  # [heads * head_dim]

        def zero_heads(x: Tensor, point: str) -> Tensor:  # x: [batch, pos, heads * head_dim]
            return x * heads[layer_of(point)]

        hooks["attn.*.heads"] = zero_heads
    with run_with_hooks(model, hooks):
        yield model


def apply_plan(model: nn.Module, plan: PruningPlan, mode: str) -> nn.Module:
    """mask() or physical() by name."""
    return (mask if check_mode(mode) == "mask" else physical)(model, plan)
