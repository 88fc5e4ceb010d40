"""Memory budgets for models larger than one device: sizes (`14GiB`, with documented bounds), accelerate's
max_memory from `0:14GiB,cpu:30GiB` (checked against the GPUs this machine has), and whether a budget can hold
one block (computed from the config alone, on the meta device)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import UserError
from .families import base_model, family_of, get_module

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE_BOUNDS = {"--max-shard-size": (2**10, 2**40)}   # option -> (least, most) bytes
MAX_SIZE = 2**50   # any other size: at most a pebibyte
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
# --- memory budgets --------------------------------------------------------------------------------

def parse_size(text: str, what: str = "size") -> int:
    """'14GiB', '500MB', '1.5GiB' or a number of bytes -> bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in UNITS:
        raise UserError(f"{what} '{text}' is not a size; write e.g. 14GiB, 500MB or a number of bytes")
    n = float(m.group(1)) * UNITS[unit]
    least, most = SIZE_BOUNDS.get(what, (1, MAX_SIZE))
    if not math.isfinite(n) or n <= 0:
        raise UserError(f"{what} '{text}' must be positive")
    if n != int(n) or not least <= n <= most:
        raise UserError(f"{what} '{text}' must be a whole number of bytes from {_fmt(least)} to {_fmt(most)}")
    return int(n)


def parse_max_memory(text: str | dict | None) -> dict | None:
    """`--max-memory 0:14GiB,cpu:30GiB` -> {0: bytes, "cpu": bytes} (accelerate's max_memory). Keys: a GPU
    index (0, cuda:0) or cpu. A dict is checked the same way."""
    if text is None:
        return None
    items = list(text.items()) if isinstance(text, dict) else [
        tuple(part.rsplit(":", 1)) if ":" in part else (part, "") for part in str(text).split(",")]
    out: dict = {}
    for key, size in items:
        k = str(key).strip().lower()
        if k.startswith("cuda:"):
            k = k[5:]
        if k.isdigit():
            k = int(k)
        elif k != "cpu":
            raise UserError(f"--max-memory: unknown device '{key}'; give entries like 0:14GiB,cpu:30GiB "
                            "(a GPU index or cpu, then a size)")
        if k in out:
            raise UserError(f"--max-memory names {key} twice")
        out[k] = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else \
            parse_size(size, f"--max-memory {key}")
    if not out:
        raise UserError("--max-memory is empty; give entries like 0:14GiB,cpu:30GiB")
    return out


def check_gpus_present(max_memory: dict | None) -> None:
    """Every GPU a budget names exists on this machine (checked before anything loads)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for k in max_memory or {}:
        if isinstance(k, int) and k >= have:
            raise UserError(f"--max-memory names GPU {k}, but this machine has {have} CUDA GPU(s); "
                            "give only the devices it has (e.g. cpu:30GiB)")


def meta_model(config, kind: str) -> nn.Module:
    """The model a config describes, on the meta device (no memory for weights)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .families import base_model_kwargs
    builder = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    kw = {} if kind == "causal-lm" else base_model_kwargs(config.model_type)
    with torch.device("meta"):
        return builder.from_config(config, **kw)


def block_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> list[int]:
    """Bytes of each block's parameters and buffers (in `dtype` if given, else as they are)."""
    base = base_model(model)
    blocks = get_module(base, family_of(model).layers)
    sizes = []
    for block in blocks:
        n = 0
        for t in list(block.parameters()) + list(block.buffers()):
            n += t.numel() * (torch.finfo(dtype).bits // 8 if dtype is not None and t.is_floating_point()
                              else t.element_size())
        sizes.append(n)
    return sizes


def gram_bytes(model: nn.Module) -> int:
    """Bytes of the float64 Gram matrix of the widest FFN's hidden activation [h; 1]."""
    from .families import ffn_widths
    return max((w + 1) ** 2 * 8 for w in ffn_widths(model))


def execution_key(max_memory: dict) -> int | str:
    """The device that runs the blocks: the first GPU in the budget, else the CPU."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return gpus[0] if gpus else "cpu"


def check_max_memory(max_memory: dict | None, model: nn.Module, dtype: torch.dtype | None, spec: str,
                     layerwise: bool = False) -> None:
    """A one-line UserError when the execution device's budget cannot hold one block (and, for layer-wise
    pruning, the Gram matrix of its FFN), naming the minimum. `model` may be on the meta device."""
    if not max_memory:
        return
    need = max(block_bytes(model, dtype)) + (gram_bytes(model) if layerwise else 0)
    key = execution_key(max_memory)
    if max_memory[key] < need:
        what = "one block" + (" and its FFN's float64 Gram matrix (layer-wise pruning)" if layerwise else "")
        raise UserError(f"--max-memory gives {key} {_fmt(max_memory[key])}, but {spec} needs {_fmt(need)} there "
                        f"for {what}; give {key}:{_fmt(need, up=True)} or more")


def _fmt(n: int, up: bool = False) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (rounded up to a whole number if `up`)."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{math.ceil(n / size)}{unit}" if up else f"{n / size:.2f}{unit}"
    return f"{n}B"
