"""Plans for a target (`--target-flops`, `--target-params`, `--target-speedup`), and the measured check of a
speedup target.

FLOPs and parameters are exact: the plan's predicted cost is its cost. A latency model is a fit, and a plan made
under it can run slower than predicted (GEMM efficiency at the plan's uneven widths, a busy machine). So a
speedup plan is checked: its shapes are pruned physically in a scratch copy and timed interleaved with the dense
model at the target's batch and length. When the measured speedup is off the target by more than CHECK_TOLERANCE,
the budget is scaled by measured / target and the plan made again, up to CHECK_ROUNDS times. A reading inside
the tolerance is confirmed by a second one, and the plan's speedup is their mean: one reading on a shared CPU
can be 10% off (benchmarks/timing_noise.py). The scale found is recorded in the cost model (info.budget_scale,
per target), so a run that reuses that cost model (`--cost-model`) makes the same plan again without timing
anything.
"""
from __future__ import annotations

import copy
import logging

import torch

from ..apply.modes import physical
from ..errors import UserError
from ..evaluate.cost import CostModel, flops_cost, latency_cost, params_cost
from ..evaluate.timing import measure_speedup
from ..models.loading import Loaded
from ..plan.allocate import plan_under_budget
from ..plan.plan import PruningPlan

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 0.03   # a measured speedup within 3% of the target ends the check
CHECK_ROUNDS = 3         # plans timed at most (the first included)
CHECK_REPEATS = 5        # timed rounds of dense and plan per check (the medians' ratio; benchmarks/timing_noise.py)
PROMISE = 0.07           # further off than this after the check: the run says what it reached


def target_key(speedup: float) -> str:
    return f"{float(speedup):g}"


def plan_for_target(loaded: Loaded, scores, target: dict, allocation: dict, who: tuple[str, int]
                    ) -> tuple[PruningPlan, dict]:
    """The joint plan of neurons and heads under the target's budget (ranked as the allocation's normalize
    says), and the cost model as a dict (with the budget, the plan's prediction and, for a checked speedup
    target, each timed round); who: (method, seed) for the plan."""
    if "flops" in target:
        cm = flops_cost(loaded, seq_len=target["seq_len"])
        budget, what = cm.dense * float(target["flops"]), f"--target-flops {target['flops']}"
    elif "params" in target:
        cm = params_cost(loaded)
        budget, what = cm.dense * float(target["params"]), f"--target-params {target['params']}"
    else:   # a saved latency model (--cost-model) is reused; otherwise one is fitted by timing
        cm = (CostModel.saved(target["cost_model"], loaded, target["batch_size"], target["seq_len"])
              if target.get("cost_model") else latency_cost(loaded, batch_size=target["batch_size"],
                                                            seq_len=target["seq_len"]))
        budget, what = cm.dense / float(target["speedup"]), f"--target-speedup {target['speedup']}"
    normalize = allocation.get("normalize", "none")
    fields = {"base_model": loaded.base_spec, "method": who[0], "seed": who[1],
              "params": {"target": target, "cost_kind": cm.kind, "normalize": normalize}}

    def make(b: float) -> PruningPlan:
        return plan_under_budget(scores, {"neurons": cm.per_neuron, "heads": cm.per_head}, cm.base, b,
                                 floor=float(target["floor"]), what=what, normalize=normalize, fields=fields)

    rounds: list[dict] = []
    if "speedup" not in target:
        plan = make(budget)
    else:
        plan, budget, rounds = _checked_plan(loaded, cm, target, budget, make)
    out = {**cm.to_dict(), "budget": budget, "predicted": cm.predict(plan.kept_widths, plan.kept_heads)}
    if rounds:
        out["checked"] = rounds
    return plan, out


def _checked_plan(loaded: Loaded, cm: CostModel, target: dict, budget: float, make):
    """A speedup target's plan: a scale recorded for this target in a reused cost model is applied (no timing);
    otherwise, when the target asks for the check (the default for a model fitted in this run), the plan is
    timed and the budget corrected (see the module doc). Returns (plan, budget, timed rounds)."""
    key, speedup = target_key(target["speedup"]), float(target["speedup"])
    scales = dict(cm.info.get("budget_scale") or {})
    recorded = scales.get(key)
    if recorded is not None:
        if not (isinstance(recorded, (int, float)) and 0.2 <= float(recorded) <= 5.0):
            raise UserError(f"the cost model's budget_scale for {key}x is {recorded!r}, not a number in [0.2, 5]; "
                            "give a cost_model.json that anatomy-prune wrote")
        return make(budget * float(recorded)), budget * float(recorded), []
    if not target.get("check", not target.get("cost_model")):
        return make(budget), budget, []
    plan, first, rounds = make(budget), budget, []
    for i in range(CHECK_ROUNDS):
        measured = measured_speedup(loaded, plan, target["batch_size"], target["seq_len"], CHECK_REPEATS)
        if abs(measured["speedup"] / speedup - 1.0) <= CHECK_TOLERANCE:   # inside: confirmed by a second reading
            again = measured_speedup(loaded, plan, target["batch_size"], target["seq_len"], CHECK_REPEATS)
            readings = [measured["speedup"], again["speedup"]]
            measured = {**measured, "speedup": sum(readings) / 2, "readings": readings}
        rounds.append({"budget_scale": budget / first, "predicted_speedup": cm.dense / cm.predict(
            plan.kept_widths, plan.kept_heads), **measured})
        off = measured["speedup"] / speedup - 1.0
        if abs(off) <= CHECK_TOLERANCE or i == CHECK_ROUNDS - 1:
            break
        nxt = min(cm.dense, budget * measured["speedup"] / speedup)   # never above the dense model's cost
        try:
            plan, budget = make(nxt), nxt
        except UserError as exc:   # the corrected budget is below what the floors leave: keep the last plan
            log.warning("the measured check wanted a smaller plan than the target allows: %s", exc)
            break
    best = min(rounds, key=lambda r: abs(r["speedup"] / speedup - 1.0))
    if best is not rounds[-1]:           # the last correction overshot: go back to the plan that was nearest
        budget = first * best["budget_scale"]
        plan = make(budget)
    cm.info["budget_scale"] = {**scales, key: budget / first}
    miss = best["speedup"] / speedup - 1.0
    if abs(miss) > PROMISE:
        log.warning("--target-speedup %s: the plan measured %.2fx after %d timed round(s) (%+.0f%%); the latency "
                    "model's per-unit costs do not hold at these widths on this machine now (a busy machine, or a "
                    "target near what the floors allow)", key, best["speedup"], len(rounds), 100 * miss)
    return plan, budget, rounds


@torch.no_grad()
def measured_speedup(loaded: Loaded, plan: PruningPlan, batch_size: int, seq_len: int, repeats: int = 5) -> dict:
    """The plan's shapes (physically pruned in a scratch copy, uncompensated: compensation changes values, not
    shapes) timed interleaved with the dense model: speedup (ratio of medians) with the paired ratios' quartiles."""
    pruned = Loaded(physical(copy.deepcopy(loaded.model), plan).eval(), loaded.tokenizer, loaded.kind, loaded.spec,
                    dict(loaded.info))
    s = measure_speedup(loaded, pruned, batch_size, seq_len, repeats)
    return {"speedup": s["measured_speedup"], "q1": s["speedup_paired_q1"], "q3": s["speedup_paired_q3"]}
