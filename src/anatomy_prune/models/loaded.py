"""`Loaded`: a model with what is needed to use it (tokenizer, kind, where it came from), and the constants
shared by loading and saving."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import Family, base_model, family_of, usable_positions

SAVED_META = "anatomy_prune.json"  # marks a model folder written by anatomy-prune (see saved.py)
KINDS = ("classifier", "causal-lm", "backbone")
SAFE = dict(trust_remote_code=False)  # every from_pretrained call: never run code shipped with a model
DTYPES = ("auto", "float32", "float16", "bfloat16")
log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The compute precision: `auto` is float16 on a CUDA GPU (a T4 has fast fp16, no fast bf16) and float32
    on a CPU; float16 asked on a CPU falls back to float32 with a warning (CPU fp16 matmuls are slow or
    missing); bfloat16 runs on both (autocast)."""
    dtype = dtype or "auto"
    if dtype not in DTYPES:
        from ..errors import UserError
        raise UserError(f"unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if dtype == "float16" and device.type != "cuda":
        log.warning("--dtype float16 needs a CUDA GPU; this run is on %s, so it runs in float32", device)
        return "float32"
    return dtype


@dataclass
class Loaded:
    """A model with what is needed to use it: tokenizer, family adapter and where it came from."""

    model: nn.Module            # BinaryClassifier, a causal LM (LM head kept) or a bare base model
    tokenizer: object           # a transformers tokenizer
    kind: str                   # one of KINDS
    spec: str                   # what the user asked for
    info: dict = field(default_factory=dict)  # provenance: base model, plan, fine-tune settings...
    dtype: str = "float32"      # compute precision of forward passes (weights stay float32; see autocast)

    def autocast(self):
        """A context for forward (and backward) passes in the compute precision: torch.autocast when it is
        float16 / bfloat16, else nothing. Statistics that need precision (similarities, Gram matrices,
        compensation) are accumulated in float32 / float64 whatever this is."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.dtype))

    @property
    def family(self) -> Family:
        return family_of(self.model)

    @property
    def config(self):
        return base_model(self.model).config

    @property
    def max_positions(self) -> int:
        """Tokens a sequence may have (RoBERTa-like and MPNet models: two fewer than their position table)."""
        return usable_positions(self.config)

    @property
    def recorded_max_length(self) -> int | None:
        """The max length a saved model was fine-tuned or pruned with, if it records one."""
        v = self.info.get("max_length") or (self.info.get("finetune") or {}).get("max_length")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None

    @property
    def device(self) -> torch.device:
        if getattr(self.model, "hf_device_map", None):  # placed by a device map: where inputs go (models.offload)
            from .offload import execution_device
            return execution_device(self.model)
        return next(self.model.parameters()).device

    @property
    def base_spec(self) -> str:
        return self.info.get("base_model", self.spec)


def finish_tokenizer(tok, model: nn.Module) -> None:
    fam = family_of(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if fam.decoder:
        tok.padding_side = "right"  # readout_index finds the last real token either way


