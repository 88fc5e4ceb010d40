"""Iterative pruning (`prune --iterations N`): the requested FFN sparsity, or what a FLOPs or parameter target
removes (heads too), in N equal shares, each share one prune_step on statistics collected again from the model
pruned so far (the same calibration texts). The returned plan maps every kept neuron and head unit back to the
dense model's ids, so plan.json describes the whole cut.
"""
from __future__ import annotations

from dataclasses import replace

import time

from ..errors import UserError
from ..evaluate.cost import flops_cost, params_cost
from ..models.loading import Loaded
from ..plan.plan import PruningPlan
from ..scores.calibration import Calibration
from .requests import PruneRequest
from .step import PruneResult, prune_step, tune_with


KEEP_ONE = 1e-9   # an intermediate step's floor: ceil(KEEP_ONE x units) keeps one unit of each kind in every layer


def step_sparsities(sparsity: float, steps: int) -> list[float]:
    """The sparsity each step asks of the model it gets: after step i the model keeps 1 - sparsity x i / steps
    of the dense neurons (allocation rounds each step's counts)."""
    kept = [1.0 - sparsity * i / steps for i in range(steps + 1)]
    return [1.0 - kept[i] / kept[i - 1] for i in range(1, steps + 1)]


def step_targets(target: dict, steps: int) -> list[float]:
    """The cost (FLOPs per token or parameters, as the target's kind counts it) the model may keep after each of
    `steps` equal shares of what the target removes from the dense model."""
    return [1.0 - (1.0 - float(target[_kind(target)])) * i / steps for i in range(1, steps + 1)]


def _kind(target: dict) -> str:
    kind = "params" if "params" in target else "flops" if "flops" in target else None
    if kind is None:
        raise UserError("--iterations takes a --sparsity, --target-flops or --target-params; a speedup target is "
                        "timed on the model it is asked of, so give it without --iterations")
    return kind


def _cost(loaded: Loaded, target: dict) -> float:
    """The model's current cost in the target's kind (its own widths: a pruned model is its own dense)."""
    return (params_cost(loaded) if _kind(target) == "params" else flops_cost(loaded, seq_len=target["seq_len"])).dense


def compose(plans: list[PruningPlan]) -> PruningPlan:
    """One plan on the dense model from plans made one after another (each on the model the last one left):
    every kept FFN neuron and head unit by its id in the dense model."""
    keep = [list(k) for k in plans[0].keep]
    heads = None if plans[0].heads is None else [list(k) for k in plans[0].heads]
    for p in plans[1:]:
        keep = [[ids[j] for j in k] for ids, k in zip(keep, p.keep)]
        if heads is not None and p.heads is not None:
            heads = [[ids[j] for j in k] for ids, k in zip(heads, p.heads)]
    first, last = plans[0], plans[-1]
    return PruningPlan(keep=keep, widths=first.widths, base_model=first.base_model, method=last.method,
                       params={**last.params, "iterations": len(plans),
                               "iteration_sparsities": [round(p.sparsity, 6) for p in plans]}, seed=last.seed,
                       heads=heads, head_widths=first.head_widths if heads is not None else None)


def prune_iterative(calib: Calibration, req: PruneRequest, *, inplace: bool = False) -> PruneResult:
    """Prune `calib`'s model to req.sparsity (or req.target) in req.iterations shares, recalibrating between
    them (see the module doc). The first step works on a copy whatever `inplace` says (the dense model stays the
    reference of a recipe's output tuning, applied once at the end); later steps prune that copy in place.
    prune_s adds up the steps' (each step's statistics included) and the tuning's."""
    loaded, seconds = calib.loaded, 0.0
    plans, reports, res = [], [], None
    if req.target:    # each step's target: the cost kept after it, over the cost of the model it gets
        kind, dense = _kind(req.target), _cost(loaded, req.target)
        costs = [kept * dense for kept in step_targets(req.target, req.iterations)]
    else:
        shares = step_sparsities(req.sparsity, req.iterations)
    for i in range(req.iterations):
        if req.target:   # before the last step every layer keeps a unit of each kind, for the next step to score
            floor = req.target["floor"] if i == req.iterations - 1 else max(req.target["floor"], KEEP_ONE)
            step = {"target": {**req.target, kind: min(1.0 - 1e-9, costs[i] / _cost(loaded, req.target)),
                               "floor": floor}}
        else:
            step = {"sparsity": round(shares[i], 9)}
        # the first step reads the statistics `calib` may hold already; later ones collect them on the pruned model
        step_calib = calib.for_model(loaded) if i else calib
        res = prune_step(step_calib, replace(req, **step, iterations=1), inplace=i > 0, tune=False)
        loaded, seconds = res.loaded, seconds + res.prune_s
        plans.append(res.plan)
        reports.append(res.compensation)
    report = None if all(r is None for r in reports) else {"iterations": reports}
    if res.recipe and res.recipe.get("tune"):      # once, at the end, toward the dense model
        start = time.perf_counter()
        report = {**(report or {}), "tune": tune_with(loaded, calib.loaded, calib, res.recipe)}
        seconds += time.perf_counter() - start
    return PruneResult(loaded, compose(plans), report, seconds, res.scores, recipe=res.recipe)
