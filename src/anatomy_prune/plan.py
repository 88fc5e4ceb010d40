"""PruningPlan: which FFN neurons each layer keeps. Plain data, JSON in and out, independent of how it is
applied (masked, or physically removed) and of how the neurons were scored."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import UserError

PLAN_FORMAT = 1


@dataclass
class PruningPlan:
    """Per layer, the sorted ids of the FFN neurons kept, out of `widths[layer]`."""

    keep: list[list[int]]
    widths: list[int]                      # d_ff of each layer in the model the plan was made for
    base_model: str = ""
    method: str = ""
    params: dict = field(default_factory=dict)
    seed: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if len(self.keep) != len(self.widths):
            raise UserError(f"plan has {len(self.keep)} layers of kept neurons but {len(self.widths)} widths")
        clean = []
        for layer, (ids, width) in enumerate(zip(self.keep, self.widths)):
            ids = sorted(int(i) for i in ids)
            if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= width)):
                raise UserError(f"plan layer {layer}: kept neuron ids must be distinct and in [0, {width})")
            clean.append(ids)
        self.keep = clean

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

    def keep_mask(self, layer: int, device: torch.device | str = "cpu") -> Tensor:
        """1.0 for kept neurons, 0.0 for removed ones: [d_ff]."""
        mask = torch.zeros(self.widths[layer], device=device)
        mask[self.keep[layer]] = 1.0
        return mask

    def check_fits(self, model: nn.Module) -> None:
        """Raise a UserError unless the plan's layers and widths are the model's."""
        from .families import ffn_widths

        widths = ffn_widths(model)
        if widths != list(self.widths):
            raise UserError(
                f"plan does not fit the model: plan widths {_short(self.widths)} vs model FFN widths "
                f"{_short(widths)}; make the plan for this model (or its unpruned base)"
            )

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        d["summary"] = {"sparsity": round(self.sparsity, 6), "neurons_removed": self.neurons_removed,
                        "removed_per_layer": self.removed_per_layer}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        try:
            return cls(keep=d["keep"], widths=d["widths"], base_model=d.get("base_model", ""),
                       method=d.get("method", ""), params=d.get("params", {}), seed=d.get("seed"),
                       created=d.get("created", ""))
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a pruning plan (missing or bad field: {exc}); expected keys keep and widths") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"plan file '{path}' not found; give the plan.json written by 'anatomy-prune prune'")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"plan file '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _short(xs: Sequence[int]) -> str:
    xs = list(xs)
    return str(xs) if len(xs) <= 8 else f"[{', '.join(map(str, xs[:4]))}, ... x{len(xs)} layers]"


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= float(sparsity) < 1.0) or math.isnan(float(sparsity)):
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def round_up(n: int, multiple: int, limit: int) -> int:
    """n rounded up to a multiple of `multiple`, capped at `limit` (multiple <= 1 leaves n as is)."""
    if multiple <= 1 or n == 0:
        return n
    return min(limit, int(math.ceil(n / multiple) * multiple))


def keep_counts(
    scores: Sequence[Tensor],
    sparsity: float,
    allocation: str = "local",
    floor: float = 0.0,
    multiple_of: int = 1,
) -> list[int]:
    """How many neurons each layer keeps for a target fraction of all neurons removed.

    local: every layer loses the same fraction. global: one ranking of all scores, each layer normalised
    by its mean absolute score, so layers differ in how much they lose; each keeps at least `floor` of its width.
    """
    widths = [int(s.numel()) for s in scores]
    total = sum(widths)
    n_keep_total = total - int(round(sparsity * total))
    if allocation == "local":
        counts = [w - int(round(sparsity * w)) for w in widths]
    elif allocation == "global":
        floors = [min(w, int(math.ceil(floor * w))) for w in widths]
        if sum(floors) > n_keep_total:
            raise UserError(
                f"sparsity {sparsity} would leave layers below the floor of {floor:.0%} of their neurons; "
                f"lower the sparsity below {1 - sum(floors) / total:.3f} or lower the floor"
            )
        normed = [s.float() / (s.float().abs().mean() + 1e-12) for s in scores]
        counts = list(floors)
        # rank every neuron above its layer's floor; take the best until the budget is spent
        pool = []
        for layer, s in enumerate(normed):
            order = torch.argsort(s, descending=True)
            extra = s[order[floors[layer]:]]
            pool.append(torch.stack([extra, torch.full_like(extra, layer)], dim=1))
        pool_t = torch.cat(pool) if pool else torch.zeros(0, 2)
        take = n_keep_total - sum(floors)
        if take > 0:
            best = torch.argsort(pool_t[:, 0], descending=True, stable=True)[:take]
            for layer in pool_t[best, 1].long().tolist():
                counts[layer] += 1
    else:
        raise UserError(f"unknown allocation '{allocation}'; choose local or global")
    return [round_up(c, multiple_of, w) for c, w in zip(counts, widths)]


def plan_from_scores(
    scores: Sequence[Tensor],
    sparsity: float,
    *,
    allocation: str = "local",
    floor: float = 0.0,
    multiple_of: int = 1,
    protect: Sequence[Sequence[int]] | None = None,
    base_model: str = "",
    method: str = "",
    params: dict | None = None,
    seed: int | None = None,
) -> PruningPlan:
    """Keep the highest-scoring neurons of each layer (scores: one [d_ff] tensor per layer, higher = keep).

    `protect` lists neurons per layer that are kept whatever their score (the anatomy's important neurons).
    """
    check_sparsity(sparsity)
    counts = keep_counts(scores, sparsity, allocation, floor, multiple_of)
    keep = []
    for layer, (s, n) in enumerate(zip(scores, counts)):
        s = s.detach().float().cpu().clone()
        if protect is not None and len(protect[layer]):
            s[list(protect[layer])] = float("inf")
            if len(protect[layer]) > n:  # protected neurons are kept even if the layer then keeps more
                logging.getLogger(__name__).warning(
                    "layer %d: %d protected neurons exceed the %d kept at sparsity %s; keeping them all",
                    layer, len(protect[layer]), n, sparsity)
                n = len(protect[layer])
        order = torch.argsort(s, descending=True, stable=True)
        keep.append(sorted(order[: max(n, 0)].tolist()))
    params = dict(params or {})
    params.update(sparsity=sparsity, allocation=allocation)
    if allocation == "global":
        params["floor"] = floor
    if multiple_of > 1:
        params["multiple_of"] = multiple_of
    return PruningPlan(keep=keep, widths=[int(s.numel()) for s in scores], base_model=base_model,
                       method=method, params=params, seed=seed)
