"""int8 on top of pruning: torch's dynamic quantization of Linear layers (weights int8, activations quantized
on the fly), the CPU recipe the first paper's abstract points at for edge devices.

Two recipes. `int8` keeps every FFN's output projection in float: its input, after the activation, holds a few
very large values that set the per-tensor activation scale, and the rest round to a handful of levels
(all-mpnet-base-v2 loses 36 points with them quantized, 0.4 without). `int8-all` quantizes every Linear.
GPT-2 stores its projections as Conv1D ([in, out]); they are turned into equivalent Linear layers first so
that they are quantized too. Layers left with no weights (all neurons pruned) stay as they are. A saved
model keeps its float weights (safetensors) and records its recipe (`quantize: int8`); loading quantizes
again, which is deterministic, so the reloaded model is the same int8 model.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import UserError
from .families import Conv1D, base_model, ffn_sites, get_module
from .surgery import SafeConv1D

QUANTIZE = ("int8", "int8-all")   # int8: FFN output projections stay float; int8-all: every Linear


def _linear_from_conv1d(mod: nn.Module) -> nn.Linear:
    w = mod.weight.detach().t().contiguous()  # Conv1D: [in, out] -> Linear: [out, in]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.detach())
    return lin


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every (non-empty) Conv1D by the equivalent Linear, in place; returns how many."""
    if not Conv1D:
        return 0
    todo = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, (Conv1D, SafeConv1D)) and mod.weight.numel() > 0]
    for name, mod in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _linear_from_conv1d(mod))
    return len(todo)


def check_quantize(quantize: str | None, device: torch.device) -> str | None:
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE:
        raise UserError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZE)} (or leave it out)")
    if device.type != "cpu":
        raise UserError(f"--quantize {quantize} is torch's dynamic CPU quantization; it does not run on {device}: "
                        "use --device cpu")
    return quantize


def float_layers(model: nn.Module, quantize: str) -> set[str]:
    """The Linear layers a recipe keeps in float: "int8" keeps every FFN's output projection (its input, after
    the activation, has a few very large values that set the per-tensor int8 scale), "int8-all" none."""
    if quantize == "int8-all":
        return set()
    base = base_model(model)
    downs = {id(get_module(base, site.down)) for site in ffn_sites(model)}
    return {name for name, m in model.named_modules() if id(m) in downs}


@torch.no_grad()
def quantize_int8(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Dynamic int8 quantization of the non-empty Linear layers (Conv1D turned into Linear first) that the recipe
    does not keep in float (float_layers), in place where possible; returns the quantized model (eval mode)."""
    if quantize not in QUANTIZE:
        raise UserError(f"unknown int8 recipe '{quantize}'; choose one of {', '.join(QUANTIZE)}")
    conv1d_to_linear(model)
    keep = float_layers(model, quantize)
    spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.numel() > 0 and name not in keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks eager-mode quantization deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)


def is_quantized_linear(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Linear" and type(mod).__module__.startswith("torch.ao.nn.quantized")
