"""Dispatched models (accelerate device maps): where inputs go, and one block on its execution device.

A model loaded with a device map has its blocks on GPUs, in CPU memory or on disk; accelerate's
`AlignDevicesHook`s move an offloaded module's weights to its execution device for each call and back to `meta`
after. Layer-wise pruning changes a block's weights and shapes, which those hooks cannot follow, so
`onloaded(block)` gives the block real weights on its execution device for the duration of a `with` (hooks
removed), and afterwards offloads what the block then holds to where it came from: CPU memory stays CPU
memory, disk goes back to disk (one safetensors file per block under the offload folder), each module with a
fresh hook. A block that was not offloaded is untouched."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from .families import base_model, family_of, get_module

log = logging.getLogger(__name__)
PRUNED_SUBFOLDER = "anatomy_prune_blocks"  # pruned blocks that go back to disk, under the offload folder


# --- dispatched models -------------------------------------------------------------------------------

def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place or offload some of the model's modules."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the main execution device of a dispatched model, else where its weights are."""
    for m in (model, base_model(model)):
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


def block_execution_device(block: nn.Module, default: torch.device) -> torch.device:
    """Where a block runs: its hooks' execution device, else where its weights are."""
    for m in block.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return default


@contextmanager
def onloaded(model: nn.Module, layer: int, offload_folder: str | Path | None = None) -> Iterator[nn.Module]:
    """Block `layer` with real weights on its execution device while inside (its offload hooks removed);
    after, its modules are offloaded again to where they were (CPU memory or disk), whatever they have
    become (sliced projections included). Yields the block. A block without offloaded modules is yielded
    as it is."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    base = base_model(model)
    prefix = family_of(model).layers + f".{layer}"
    block = get_module(base, prefix)
    homes: dict[str, dict] = {}   # module path under the block -> how it was offloaded
    device = block_execution_device(block, execution_device(model))
    for name, mod in block.named_modules():
        if not _offloaded(mod):
            continue
        hook = mod._hf_hook
        wm = hook.weights_map
        names = [n for n, _ in named_module_tensors(mod, include_buffers=hook.offload_buffers,
                                                    recurse=hook.place_submodules, remove_non_persistent=True)]
        loader = getattr(wm, "dataset", wm)
        key = getattr(wm, "prefix", "") + (names[0] if names else "")
        on_disk = key not in getattr(loader, "state_dict", {})
        homes[name] = dict(disk=on_disk, buffers=hook.offload_buffers, recurse=hook.place_submodules,
                           skip=hook.skip_keys, folder=getattr(loader, "save_folder", None),
                           device=hook.execution_device)
        values = {n: wm[n] for n in names}
        remove_hook_from_module(mod)
        for n, v in values.items():
            set_module_tensor_to_device(mod, n, device, value=v)
    try:
        yield block
    finally:
        if homes:
            _offload_again(block, base, prefix, homes, offload_folder, AlignDevicesHook, add_hook_to_module,
                           named_module_tensors)


def _offload_again(block, base, prefix, homes, offload_folder, AlignDevicesHook, add_hook_to_module,
                   named_module_tensors) -> None:
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
    from safetensors.torch import save_file

    cpu_state, disk_state = {}, {}
    for name, home in homes.items():
        mod = get_module(block, name) if name else block
        for n, t in named_module_tensors(mod, include_buffers=home["buffers"], recurse=home["recurse"],
                                         remove_non_persistent=True):
            full = f"{prefix}.{name}.{n}" if name else f"{prefix}.{n}"
            (disk_state if home["disk"] else cpu_state)[full] = t.detach().to("cpu").contiguous()
    index = {}
    if disk_state:
        folder = next((h["folder"] for h in homes.values() if h["disk"] and h["folder"]), None) or offload_folder
        if folder is None:
            raise UserError("this model offloads blocks to disk but has no offload folder; give --offload-folder")
        target = Path(folder) / PRUNED_SUBFOLDER / f"{prefix}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(disk_state, str(target))
        index = {k: {"safetensors_file": str(target), "weight_name": k} for k in disk_state}
    loader = OffloadedWeightsLoader(state_dict=cpu_state, index=index)
    for name, home in homes.items():
        mod = get_module(block, name) if name else block
        hook = AlignDevicesHook(execution_device=home["device"], offload=True,
                                weights_map=PrefixedDataset(loader, f"{prefix}.{name}." if name else f"{prefix}."),
                                offload_buffers=home["buffers"], place_submodules=home["recurse"],
                                skip_keys=home["skip"])
        add_hook_to_module(mod, hook)   # init_hook puts the module's tensors on meta
    log.debug("block %s offloaded again (%d tensors to disk, %d to CPU memory)", prefix, len(disk_state),
              len(cpu_state))
