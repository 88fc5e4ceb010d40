"""Models larger than one device: accelerate device maps, memory budgets, and one block on the execution device.

A model loaded with a device map (`load_model(spec, device_map="auto", max_memory=..., offload_folder=...)`)
has its blocks on GPUs, in CPU memory or on disk; accelerate's `AlignDevicesHook`s move an offloaded module's
weights to its execution device for each call and back to `meta` after. Layer-wise pruning changes a block's
weights and shapes, which those hooks cannot follow, so `onloaded(block)` gives the block real weights on its
execution device for the duration of a `with` (hooks removed), and afterwards offloads what the block then
holds to where it came from: CPU memory stays CPU memory, disk goes back to disk (one safetensors file per
block under the offload folder), each module with a fresh hook. A block that was not offloaded is untouched.

`parse_max_memory` reads `0:14GiB,cpu:30GiB`; `block_bytes` / `check_max_memory` say, from the config alone
(a model built on the meta device), whether a budget can hold one block.
"""
from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from .families import base_model, family_of, get_module

log = logging.getLogger(__name__)

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
PRUNED_SUBFOLDER = "anatomy_prune_blocks"  # pruned blocks that go back to disk, under the offload folder


# --- memory budgets --------------------------------------------------------------------------------

def parse_size(text: str, what: str = "size") -> int:
    """'14GiB', '500MB', '1.5GiB' or a number of bytes -> bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in UNITS:
        raise UserError(f"{what} '{text}' is not a size; write e.g. 14GiB, 500MB or a number of bytes")
    n = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise UserError(f"{what} '{text}' must be positive")
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
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{math.ceil(n / size)}{unit}" if up else f"{n / size:.2f}{unit}"
    return f"{n}B"


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


# --- where a model goes when it is loaded ------------------------------------------------------------

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class Placement:
    """How `load_model` places a model: accelerate's device map ("auto", "balanced", "sequential", a device
    name, or a dict of module -> device), a memory budget per device, the folder for weights offloaded to
    disk, and the weights' dtype (None: float32, as every other load; "auto": as the checkpoint stores them).
    `layerwise`: the budget must also hold an FFN's Gram matrix (layer-wise pruning)."""

    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    weights_dtype: str | None = None
    layerwise: bool = False

    @classmethod
    def make(cls, device_map=None, max_memory=None, offload_folder=None, weights_dtype=None,
             layerwise: bool = False) -> "Placement | None":
        """Checked arguments (one-line UserErrors), or None when nothing differs from a plain load."""
        if device_map is None and max_memory is None and offload_folder is None and weights_dtype in (None, "float32"):
            return None
        if weights_dtype is not None and weights_dtype not in WEIGHT_DTYPES:
            raise UserError(f"unknown --weights-dtype '{weights_dtype}'; choose one of {', '.join(WEIGHT_DTYPES)}")
        if (max_memory is not None or offload_folder is not None) and device_map is None:
            raise UserError("--max-memory and --offload-folder go with --device-map (e.g. --device-map auto)")
        if isinstance(device_map, str) and not device_map.strip():
            raise UserError("--device-map is empty; give auto, balanced, sequential or a device (cpu, cuda:0)")
        if offload_folder is not None:
            folder = Path(offload_folder).expanduser()
            if folder.exists() and not folder.is_dir():
                raise UserError(f"--offload-folder '{offload_folder}' is a file; give a folder")
            offload_folder = str(folder)
        return cls(device_map, parse_max_memory(max_memory), offload_folder, weights_dtype, layerwise)

    def torch_dtype(self, config=None) -> torch.dtype:
        """The weights' dtype: float32 unless asked, the checkpoint's for "auto" (float32 if it says none)."""
        name = self.weights_dtype or "float32"
        if name == "auto":
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            if isinstance(stored, str):
                stored = getattr(torch, stored, None)
            return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32
        return getattr(torch, name)

    def pretrained_kwargs(self, config) -> dict:
        """Arguments for from_pretrained."""
        kw: dict = {"dtype": self.torch_dtype(config)}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
            if self.max_memory is not None:
                kw["max_memory"] = self.max_memory
            if self.offload_folder is not None:
                kw["offload_folder"] = self.offload_folder
        return kw

    def check_config(self, config, kind: str, spec: str) -> None:
        """The budget check, from the config alone (before anything is loaded)."""
        if self.max_memory:
            check_max_memory(self.max_memory, meta_model(config, kind), self.torch_dtype(config), spec,
                             self.layerwise)

    def place(self, model: nn.Module, kind: str, spec: str) -> nn.Module:
        """Place a model that is already in memory (an alias, a saved anatomy-prune folder): cast, check
        the budget, dispatch. Its weights were read whole first, so memory is bounded only afterwards."""
        model.to(self.torch_dtype(base_model(model).config))
        if self.device_map is None:
            return model
        if kind == "classifier":
            raise UserError("--device-map places causal LMs and backbones; a classifier loads on one device")
        check_max_memory(self.max_memory, model, None, spec, self.layerwise)
        from accelerate import dispatch_model, infer_auto_device_map

        dm = self.device_map
        if isinstance(dm, str) and dm in ("auto", "balanced", "balanced_low_0", "sequential"):
            dm = infer_auto_device_map(model, max_memory=self.max_memory,
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
        elif isinstance(dm, str):
            dm = {"": dm}
        folder = None
        if "disk" in set(dm.values()):
            if self.offload_folder is None:
                raise UserError(f"the device map puts part of {spec} on disk; give --offload-folder DIR")
            import tempfile
            Path(self.offload_folder).mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="offload-", dir=self.offload_folder)  # never a stale index.json
        model = dispatch_model(model, dm, offload_dir=folder)
        model.hf_device_map = dict(dm)
        return model


# --- weights that map a checkpoint file ---------------------------------------------------------------

def release_mapped_pages(tensors) -> int:
    """Drop from this process the pages of `tensors` that map a checkpoint file (transformers maps safetensors
    files privately and its tensors are views into them), once the caller no longer needs their values: a
    layer-wise pass calls it on a block's replaced FFN weights, so pages it read do not stay resident for the
    rest of the run. The tensors must still be referenced (so the mapping cannot be gone and its addresses
    reused) and must never have been written (a private mapping's written pages would revert to the file; the
    layer-wise pass never writes them). Pages are released with madvise(MADV_DONTNEED): a later read maps the
    file's unchanged contents again. Linux only; elsewhere, and for tensors not backed by such a file, nothing
    happens. Returns the bytes released."""
    import ctypes
    import mmap

    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1].endswith("p") and parts[-1].endswith(".safetensors"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((a, b))
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(a <= lo and hi <= b for a, b in spans):
            continue
        start, end = -(-lo // page) * page, hi // page * page   # whole pages inside the tensor only
        if end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:  # DONTNEED
            released += end - start
    return released
