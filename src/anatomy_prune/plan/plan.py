"""PruningPlan: which FFN neurons, and optionally which attention head units (a head, or a key/value group
under GQA), each layer keeps. Immutable data, JSON in and out; it records one sparsity, the one it reaches.
A plan read from a file is untrusted: every field is checked before anything is built from it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.families import attention_sites, ffn_widths
from ..runfolder import read_json, write_json

PLAN_FORMAT = 1
MAX_LAYERS = 4096          # bounds for a plan read from a file, checked before anything is allocated
MAX_WIDTH = 1 << 20
MAX_HEADS = 1 << 16
MAX_PLAN_BYTES = 256 << 20


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class PruningPlan:
    """Per layer, the sorted ids of the FFN neurons kept, out of `widths[layer]`; optionally the sorted ids
    of the head units kept, out of `head_widths[layer]` (None: attention is not pruned)."""

    keep: tuple[tuple[int, ...], ...]      # per layer, sorted (given as lists or tuples; stored as tuples)
    widths: tuple[int, ...]                # d_ff of each layer in the model the plan was made for
    base_model: str = ""
    method: str = ""
    params: dict = field(default_factory=dict)
    seed: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    heads: tuple[tuple[int, ...], ...] | None = None  # per layer, sorted ids of the head units kept
    head_widths: tuple[int, ...] | None = None        # head units of each layer in the model the plan was made for

    def __post_init__(self) -> None:
        where = "plan"
        if not isinstance(self.widths, (list, tuple)) or not all(_is_int(w) and 0 < w <= MAX_WIDTH for w in self.widths):
            raise UserError(f"{where}: 'widths' must be a list of positive whole numbers (at most {MAX_WIDTH})")
        if not isinstance(self.keep, (list, tuple)) or len(self.keep) != len(self.widths):
            raise UserError(f"{where} has {len(self.keep) if isinstance(self.keep, (list, tuple)) else 'no'} "
                            f"layers of kept neurons but {len(self.widths)} widths")
        if len(self.widths) > MAX_LAYERS:
            raise UserError(f"{where} has {len(self.widths)} layers; at most {MAX_LAYERS} are allowed")
        clean = []
        for layer, (ids, width) in enumerate(zip(self.keep, self.widths)):
            if not isinstance(ids, (list, tuple, range)) or not all(_is_int(i) for i in ids):
                raise UserError(f"{where} layer {layer}: kept neuron ids must be whole numbers")
            ids = sorted(int(i) for i in ids)
            if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= width)):
                raise UserError(f"{where} layer {layer}: kept neuron ids must be distinct and in [0, {width})")
            clean.append(ids)
        if self.widths and not any(clean):
            raise UserError(f"{where} keeps no neuron in any layer; a model needs some (lower the sparsity)")
        if not isinstance(self.params, dict):
            raise UserError(f"{where}: 'params' must be a JSON object")
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"{where}: 'seed' must be a whole number or null")
        if not isinstance(self.method, str) or not isinstance(self.base_model, str):
            raise UserError(f"{where}: 'method' and 'base_model' must be text")
        object.__setattr__(self, "keep", tuple(tuple(k) for k in clean))  # immutable all the way down
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "params", copy.deepcopy(self.params))
        self._check_heads(where)

    def _check_heads(self, where: str) -> None:
        if self.heads is None and self.head_widths is None:
            return
        if self.heads is None or self.head_widths is None:
            raise UserError(f"{where}: 'heads' and 'head_widths' go together (give both or neither)")
        hw = self.head_widths
        if not isinstance(hw, (list, tuple)) or not all(_is_int(w) and 0 < w <= MAX_HEADS for w in hw):
            raise UserError(f"{where}: 'head_widths' must be a list of positive whole numbers (at most {MAX_HEADS})")
        if len(hw) != len(self.widths):
            raise UserError(f"{where} has {len(hw)} head widths for {len(self.widths)} layers")
        if not isinstance(self.heads, (list, tuple)) or len(self.heads) != len(hw):
            raise UserError(f"{where} has {len(self.heads) if isinstance(self.heads, (list, tuple)) else 'no'} "
                            f"layers of kept heads for {len(hw)} layers")
        clean = []
        for layer, (ids, width) in enumerate(zip(self.heads, hw)):
            if not isinstance(ids, (list, tuple, range)) or not all(_is_int(i) for i in ids):
                raise UserError(f"{where} layer {layer}: kept head ids must be whole numbers")
            ids = sorted(int(i) for i in ids)
            if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= width)):
                raise UserError(f"{where} layer {layer}: kept head ids must be distinct and in [0, {width})")
            clean.append(ids)
        if hw and not any(clean):
            raise UserError(f"{where} keeps no attention head in any layer; a model needs some (lower the sparsity)")
        object.__setattr__(self, "heads", tuple(tuple(k) for k in clean))
        object.__setattr__(self, "head_widths", tuple(int(w) for w in hw))

    # --- counts -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.widths)

    @property
    def kept_widths(self) -> list[int]:
        return [len(k) for k in self.keep]

    @property
    def removed_per_layer(self) -> list[int]:
        return [w - len(k) for w, k in zip(self.widths, self.keep)]

    @property
    def neurons_removed(self) -> int:
        return sum(self.removed_per_layer)

    @property
    def sparsity(self) -> float:
        """Fraction of all FFN neurons removed."""
        return self.neurons_removed / max(1, sum(self.widths))

    def removed(self, layer: int) -> list[int]:
        kept = set(self.keep[layer])
        return [j for j in range(self.widths[layer]) if j not in kept]

    @property
    def kept_heads(self) -> list[int] | None:
        """Head units kept per layer (None: attention is not pruned)."""
        return None if self.heads is None else [len(k) for k in self.heads]

    @property
    def heads_removed_per_layer(self) -> list[int]:
        if self.heads is None:
            return [0] * self.n_layers
        return [w - len(k) for w, k in zip(self.head_widths, self.heads)]

    @property
    def heads_removed(self) -> int:
        return sum(self.heads_removed_per_layer)

    @property
    def head_sparsity(self) -> float:
        """Fraction of all head units removed (0.0 when attention is not pruned)."""
        return self.heads_removed / max(1, sum(self.head_widths or ()))

    def removed_heads(self, layer: int) -> list[int]:
        if self.heads is None:
            return []
        kept = set(self.heads[layer])
        return [u for u in range(self.head_widths[layer]) if u not in kept]

    def head_keep_mask(self, layer: int, device: torch.device | str = "cpu") -> Tensor:
        """1.0 for kept head units, 0.0 for removed ones: [head units] (all ones without heads)."""
        if self.heads is None:
            raise ValueError("this plan does not prune attention heads")
        mask = torch.zeros(self.head_widths[layer], device=device)
        mask[list(self.heads[layer])] = 1.0
        return mask

    def keep_mask(self, layer: int, device: torch.device | str = "cpu") -> Tensor:
        """1.0 for kept neurons, 0.0 for removed ones: [d_ff]."""
        mask = torch.zeros(self.widths[layer], device=device)
        mask[list(self.keep[layer])] = 1.0
        return mask

    def check_fits(self, model: nn.Module) -> None:
        """Raise a UserError unless the plan's layers and widths (and head units) are the model's."""
        widths = ffn_widths(model)
        if widths != list(self.widths):
            raise UserError(
                f"plan does not fit the model: plan widths {_short(self.widths)} vs model FFN widths "
                f"{_short(widths)}; make the plan for this model (or its unpruned base)"
            )
        if self.heads is None:
            return
        sites = attention_sites(model)
        units = [s.n_units for s in sites]
        if units != list(self.head_widths):
            group = max(s.group for s in sites)
            what = f"key/value groups of {group} query heads" if group > 1 else "heads"
            raise UserError(
                f"plan does not fit the model: plan head widths {_short(self.head_widths)} vs the model's "
                f"{_short(units)} head units per layer ({what}); make the plan for this model (or its unpruned base)"
            )

    def with_info(self, **changes) -> "PruningPlan":
        """A copy with other provenance (base_model, method, seed, params); the kept neurons are the same."""
        d = {k: getattr(self, k) for k in ("keep", "widths", "base_model", "method", "params", "seed", "created",
                                           "heads", "head_widths")}
        d.update(changes)
        return PruningPlan(**d)

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(getattr(self, k)) for k in ("base_model", "method", "params", "seed", "created")}
        d["keep"] = [list(k) for k in self.keep]
        d["widths"] = list(self.widths)
        d["format"] = PLAN_FORMAT
        d["summary"] = {"sparsity": round(self.sparsity, 6), "neurons_removed": self.neurons_removed,
                        "removed_per_layer": self.removed_per_layer}
        if self.heads is not None:  # (a plan without heads is written as before)
            d["heads"] = [list(k) for k in self.heads]
            d["head_widths"] = list(self.head_widths)
            d["summary"].update(head_sparsity=round(self.head_sparsity, 6), heads_removed=self.heads_removed,
                                heads_removed_per_layer=self.heads_removed_per_layer)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> "PruningPlan":
        if not isinstance(d, dict) or "keep" not in d or "widths" not in d:
            raise UserError(f"{where} is not a pruning plan: expected a JSON object with 'keep' and 'widths'")
        try:
            return cls(keep=d["keep"], widths=d["widths"], base_model=d.get("base_model", "") or "",
                       method=d.get("method", "") or "", params=d.get("params", {}) or {}, seed=d.get("seed"),
                       created=str(d.get("created", "")), heads=d.get("heads"), head_widths=d.get("head_widths"))
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('plan: ').removeprefix('plan ')}") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"plan file '{path}' not found; give the plan.json written by 'anatomy-prune prune'")
        if p.stat().st_size > MAX_PLAN_BYTES:
            raise UserError(f"plan file '{path}' is larger than {MAX_PLAN_BYTES >> 20} MB; it is not a plan")
        return cls.from_dict(read_json(p, "plan file"), where=f"plan file '{path}'")


def _short(xs: Sequence[int]) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= 8 else f"[{', '.join(map(str, xs[:4]))}, ... x{len(xs)} layers]"


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [0, 1), got {sparsity!r}") from None
    if isinstance(sparsity, bool) or math.isnan(s) or not 0.0 <= s < 1.0:
        raise UserError(f"{what} must be in [0, 1), got {sparsity}")
    return s


def round_up(n: int, multiple: int, limit: int) -> int:
    """n rounded up to a multiple of `multiple`, capped at `limit` (multiple <= 1 leaves n as is)."""
    if multiple <= 1 or n == 0:
        return n
    return min(limit, int(math.ceil(n / multiple) * multiple))
