"""Where a model goes when it is loaded (`Placement`): accelerate's device map, a memory budget per device,
offloading to disk, and the weights' dtype, all checked against this machine before anything loads. Weights
offloaded to disk go into the running job's staging folder (runfolder.active_scratch) and are removed with it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..runfolder import active_scratch
from .budget import check_gpus_present, check_max_memory, meta_model, parse_max_memory
from .families import base_model

# --- where a model goes when it is loaded ------------------------------------------------------------

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "auto")
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_GPU = re.compile(r"^(?:cuda:)?(\d+)$|^cuda$")


def check_device(dev, what: str = "--device-map", disk: bool = False) -> str | int:
    """One device of a device map, checked against this machine: cpu, cuda, cuda:N or N (a GPU it has),
    disk (inside a dict map only). meta and unknown names are refused."""
    if isinstance(dev, int) and not isinstance(dev, bool):
        text = str(dev)
    elif isinstance(dev, (str, torch.device)):
        text = str(dev).strip().lower()
    else:
        raise UserError(f"{what}: {str(dev)[:30]!r} is not a device; give cpu or cuda:N")
    if text == "cpu" or (disk and text == "disk"):
        return text
    if text == "meta":
        raise UserError(f"{what} meta: the meta device holds no weights; give auto, cpu or cuda:N")
    m = _GPU.match(text)
    if not m:
        raise UserError(f"{what} '{text}' is not a device; give auto, balanced, sequential, cpu or cuda:N")
    index = int(m.group(1) or 0)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= have:
        raise UserError(f"{what} {text}: this machine has {have} CUDA GPU(s); use cpu or auto")
    return index if m.group(1) is not None and not text.startswith("cuda") else f"cuda:{index}"


def check_device_map(device_map) -> str | dict | None:
    """A device map (a strategy, a device, or a dict of module -> device), every device checked here."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if not device_map:
            raise UserError("--device-map is an empty mapping; give auto or module -> device entries")
        return {str(k): check_device(v, "--device-map", disk=True) for k, v in device_map.items()}
    text = str(device_map).strip()
    if not text:
        raise UserError("--device-map is empty; give auto, balanced, sequential or a device (cpu, cuda:0)")
    if text in MAP_STRATEGIES:
        return text
    if text.lower() == "disk":
        raise UserError("--device-map disk cannot run a model; give --device-map auto with --max-memory to offload "
                        "what does not fit")
    return str(check_device(text))


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
        device_map = check_device_map(device_map)
        if offload_folder is not None:
            folder = Path(offload_folder).expanduser()
            if folder.exists() and not folder.is_dir():
                raise UserError(f"--offload-folder '{offload_folder}' is a file; give a folder")
            offload_folder = str(folder)
        budget = parse_max_memory(max_memory)
        check_gpus_present(budget)
        return cls(device_map, budget, offload_folder, weights_dtype, layerwise)

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
            folder = self.offload_dir(fresh=False)
            if folder is not None:
                kw["offload_folder"] = folder
        return kw

    def offload_dir(self, fresh: bool = True) -> str | None:
        """Where weights offloaded to disk go: inside the running job's staging folder (removed with it), else
        --offload-folder (`fresh`: a new folder under it, never a stale index.json), else None."""
        scratch = active_scratch("offload")
        if scratch is not None:
            return str(scratch)
        if self.offload_folder is None or not fresh:
            return self.offload_folder
        import tempfile
        Path(self.offload_folder).mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix="offload-", dir=self.offload_folder)

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
            dm = {"": check_device(dm)}
        folder = None
        if "disk" in set(dm.values()):
            folder = self.offload_dir()
            if folder is None:
                raise UserError(f"the device map puts part of {spec} on disk; give --offload-folder DIR")
        model = dispatch_model(model, dm, offload_dir=folder)
        model.hf_device_map = dict(dm)
        return model
