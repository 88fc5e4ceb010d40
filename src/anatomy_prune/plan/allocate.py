"""The one allocator: scores (higher = keep) -> how many units each layer keeps -> which -> a PruningPlan.

Kinds: local (the same fraction per layer), global (one ranking above each layer's floor; `normalize` "mean"
for scores in arbitrary units, "standard" for each layer's (s - mean) / std as FLAP ranks, "none" for scores
that compare across layers), threshold (keep scores >= 0); then rounding up to `multiple_of`, must-keep units
kept, ties broken by index; head units (`head_sparsity`) by one raw ranking above the same floor.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..scores.registry import Scores
from ..validate import fraction, positive_int
from .plan import PruningPlan, check_sparsity, round_up

log = logging.getLogger(__name__)

KINDS = ("local", "global", "threshold")
NORMALIZE = ("none", "mean", "standard")
MAX_MULTIPLE = 1 << 16


def check_allocation(allocation: dict) -> dict:
    """Fill defaults and validate an allocation dict; returns a clean copy."""
    a = {"kind": "local", "floor": 0.0, "normalize": "mean", "multiple_of": 1, "head_sparsity": None,
         **(allocation or {})}
    if a["kind"] not in KINDS:
        raise UserError(f"unknown allocation '{a['kind']}'; choose one of {', '.join(KINDS)}")
    if a["normalize"] not in NORMALIZE:
        raise UserError(f"unknown normalize '{a['normalize']}'; choose one of {', '.join(NORMALIZE)}")
    a["floor"] = fraction(a["floor"], "floor", closed=True)
    a["multiple_of"] = positive_int(a["multiple_of"], "--multiple-of", MAX_MULTIPLE)
    if a["head_sparsity"] is not None:
        a["head_sparsity"] = check_sparsity(a["head_sparsity"], "head_sparsity")
    return a


def keep_counts(values: Sequence[Tensor], sparsity: float | None, allocation: dict) -> list[int]:
    """How many neurons each layer keeps for a target fraction of all neurons removed."""
    return _counts(values, sparsity, check_allocation(allocation))


def _counts(values: Sequence[Tensor], sparsity: float | None, a: dict) -> list[int]:
    """keep_counts for an allocation already checked (check_allocation); the sparsity is checked here, once."""
    widths = [int(s.numel()) for s in values]
    total = sum(widths)
    if a["kind"] == "threshold":
        counts = [int((s.double() >= 0).sum()) for s in values]
    else:
        if sparsity is None:
            raise UserError(f"{a['kind']} allocation needs a target sparsity")
        sparsity = check_sparsity(sparsity)
        n_keep = total - int(round(sparsity * total))
        if a["kind"] == "local":
            counts = [w - int(round(sparsity * w)) for w in widths]
        else:
            counts = _global_counts(values, widths, n_keep, a["floor"], a["normalize"], sparsity)
    return [round_up(c, a["multiple_of"], w) for c, w in zip(counts, widths)]


def normalized(s: Tensor, normalize: str) -> Tensor:
    """One layer's scores for a global ranking: as they are, over their mean |s|, or standardised."""
    if normalize == "mean":
        return s / (s.abs().mean() + 1e-30)
    if normalize == "standard":
        return (s - s.mean()) / (s.std() + 1e-30) if s.numel() > 1 else s - s.mean()
    return s


def _global_counts(values: Sequence[Tensor], widths: list[int], n_keep: int, floor: float, normalize: str,
                   sparsity: float) -> list[int]:
    total = sum(widths)
    floors = [min(w, int(math.ceil(floor * w))) for w in widths]
    if sum(floors) > n_keep:
        raise UserError(f"sparsity {sparsity} would leave layers below the floor of {floor:.0%} of their "
                        f"neurons; lower the sparsity to at most {math.floor((1 - sum(floors) / total) * 1e4) / 1e4} "
                        "or lower the floor")
    pool_s, pool_l = [], []
    for layer, s in enumerate(values):
        s = normalized(s.detach().double().cpu(), normalize)
        rest = torch.sort(s, descending=True).values[floors[layer]:]  # the floor's best are kept anyway
        pool_s.append(rest)
        pool_l.append(torch.full((rest.numel(),), layer, dtype=torch.long))
    counts = list(floors)
    take = n_keep - sum(floors)
    if take > 0:
        best = torch.argsort(torch.cat(pool_s), descending=True, stable=True)[:take]
        for layer in torch.cat(pool_l)[best].tolist():
            counts[layer] += 1
    return counts


def select(values: Sequence[Tensor], counts: Sequence[int], must_keep: Sequence[Sequence[int]] | None = None
           ) -> list[list[int]]:
    """Per layer, the ids of the `counts[layer]` highest scores (sorted), must-keep neurons first."""
    keep = []
    for layer, (s, n) in enumerate(zip(values, counts)):
        s = s.detach().double().cpu().clone()
        if must_keep is not None and len(must_keep[layer]):
            s[list(must_keep[layer])] = float("inf")
            if len(must_keep[layer]) > n:  # protected neurons are kept even if the layer then keeps more
                log.warning("layer %d: %d protected neurons exceed the %d kept; keeping them all",
                            layer, len(must_keep[layer]), n)
                n = len(must_keep[layer])
        order = torch.argsort(s, descending=True, stable=True)
        keep.append(sorted(order[: max(n, 0)].tolist()))
    return keep


def plan_from_scores(scores: Scores | Sequence[Tensor], sparsity: float | None, *, allocation: dict | None = None,
                     base_model: str = "", method: str = "", seed: int | None = None) -> PruningPlan:
    """Turn scores into a PruningPlan: `allocation` (check_allocation's keys; default local) says how.
    `scores` is a scorer's Scores or plain per-layer tensors; head units are kept too where the scores
    have them and the allocation names a head_sparsity."""
    if not isinstance(scores, Scores):
        scores = Scores(values=list(scores))
    a = check_allocation(allocation)
    counts = _counts(scores.values, sparsity, a)
    keep = select(scores.values, counts, scores.must_keep)
    params = dict(scores.params)
    params["allocation"] = a["kind"]
    if a["kind"] == "global":
        params.update(floor=a["floor"], normalize=a["normalize"])
    if a["multiple_of"] > 1:
        params["multiple_of"] = a["multiple_of"]
    heads = head_widths = None
    if scores.head_values is not None and a["head_sparsity"] is not None:
        hs = a["head_sparsity"]
        head_counts = keep_counts(scores.head_values, hs, {"kind": "global", "floor": a["floor"], "normalize": "none"})
        heads = select(scores.head_values, head_counts)
        head_widths = [int(v.numel()) for v in scores.head_values]
        params["head_sparsity"] = hs
    return PruningPlan(keep=keep, widths=[int(s.numel()) for s in scores.values], base_model=base_model,
                       method=method, params=params, seed=scores.seed if seed is None else seed,
                       heads=heads, head_widths=head_widths)


def plan_under_budget(scores: Scores, costs: dict, base: float, budget: float, *, floor: float = 0.0,
                      what: str = "the target", fields: dict | None = None, normalize: str = "none") -> PruningPlan:
    """A plan whose cost (base + per-unit costs of what it keeps) is within `budget`: FFN neurons and, where
    the scores have them, head units compete in one ranking by score per cost (keep_under_budget), or, with
    normalize="standard", by their per-layer standardised scores (FLAP's; they are already on one scale).
    costs: {"neurons": [per layer], "heads": [per layer]}; fields: base_model, method, seed, params."""
    f = {"base_model": "", "method": "", "seed": None, "params": None, **(fields or {})}
    values = {"neurons": scores.values}
    if scores.head_values is not None:
        values["heads"] = scores.head_values
    if normalize not in NORMALIZE:
        raise UserError(f"unknown normalize '{normalize}'; choose one of {', '.join(NORMALIZE)}")
    ranked = {k: [normalized(v.detach().double().cpu(), normalize) for v in vs] for k, vs in values.items()}
    kept = keep_under_budget(ranked, {k: costs[k] for k in values}, base, budget, floor=floor, what=what,
                             per_cost=normalize != "standard")
    keep = select(scores.values, kept["neurons"])
    heads = select(scores.head_values, kept["heads"]) if "heads" in kept else None
    p = {**scores.params, **(f["params"] or {}), "allocation": "budget", "floor": floor, "budget": budget, "base_cost": base}
    return PruningPlan(keep=keep, widths=[int(v.numel()) for v in scores.values], base_model=f["base_model"],
                       method=f["method"], params=p, seed=scores.seed if f["seed"] is None else f["seed"], heads=heads,
                       head_widths=[int(v.numel()) for v in scores.head_values] if heads is not None else None)


def keep_under_budget(values: dict[str, Sequence[Tensor]], costs: dict[str, Sequence[float]], base: float,
                      budget: float, floor: float = 0.0, what: str = "the target", per_cost: bool = True
                      ) -> dict[str, list[int]]:
    """How many units of each kind ("neurons", "heads") each layer keeps so that base + sum(cost x kept) <=
    budget: lowest score-per-cost removed first, greedily (Kwon et al. 2022's constraint-driven search; their
    Fisher scores compare across kinds); per_cost=False: lowest score first. Every layer keeps `floor` of each kind; a budget below what the
    floors leave is a UserError naming the best reachable cost."""
    pool_r, pool_k, pool_l = [], [], []
    kinds = list(values)
    counts = {k: [int(v.numel()) for v in values[k]] for k in kinds}
    floors = {k: [int(math.ceil(floor * n)) for n in counts[k]] for k in kinds}
    total = base + sum(c * n for k in kinds for c, n in zip(costs[k], counts[k]))
    lowest = base + sum(c * f for k in kinds for c, f in zip(costs[k], floors[k]))
    if budget < lowest - 1e-9 * max(1.0, abs(lowest)):
        raise UserError(f"{what} is out of reach: pruning can bring the cost from {total:.4g} down to {lowest:.4g} "
                        f"at best ({lowest / max(total, 1e-30):.1%} of the dense model's; as a speedup, at most "
                        f"{total / max(lowest, 1e-30):.2f}x); ask for less")
    for ki, k in enumerate(kinds):
        for layer, (v, c) in enumerate(zip(values[k], costs[k])):
            if c <= 0:
                continue
            s = torch.sort(v.detach().double().cpu()).values  # ascending: the first to go
            removable = s[: max(0, counts[k][layer] - floors[k][layer])]
            pool_r.append(removable / c if per_cost else removable)
            pool_k.append(torch.full((removable.numel(),), ki, dtype=torch.long))
            pool_l.append(torch.full((removable.numel(),), layer, dtype=torch.long))
    kept = {k: list(counts[k]) for k in kinds}
    excess = total - budget
    if excess > 0 and pool_r:
        ratio, kind_of, layer_of = torch.cat(pool_r), torch.cat(pool_k), torch.cat(pool_l)
        order = torch.argsort(ratio, stable=True)
        for i in order.tolist():
            if excess <= 0:
                break
            k, layer = kinds[int(kind_of[i])], int(layer_of[i])
            kept[k][layer] -= 1
            excess -= costs[k][layer]
    return kept
