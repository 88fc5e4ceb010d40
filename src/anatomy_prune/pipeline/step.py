"""The pruning step: calibration statistics -> scores -> plan -> (compensation) -> applied model.

One function, `prune_step(calib, req)`, serves the `prune` command, sweeps, every benchmark and the
notebooks: a calibration sample (which knows its model) and a PruneRequest in; the pruned model (a copy
unless `inplace`), the plan, the compensation report and the seconds out. Nothing is recorded on the model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from ..apply.compensate import compensate as refit, compensate_heads
from ..apply.modes import apply_plan
from ..errors import UserError
from ..evaluate.cost import flops_cost, latency_cost
from ..models.loading import Loaded
from ..models.quantize import check_quantize, quantize_int8
from ..plan.allocate import plan_from_scores, plan_under_budget
from ..plan.plan import PruningPlan
from ..scores.calibration import Calibration, calibration_pass
from ..scores.registry import Scores, check_params, get_scorer, score
from .requests import PruneRequest, compensation_recipe

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    loaded: Loaded               # the pruned model (a copy of the input unless inplace=True)
    plan: PruningPlan
    compensation: dict | None    # the compensation's summary (None: not compensated)
    prune_s: float               # scores + plan + compensation, charged as a standalone run would pay
    scores: Scores | None = None # what the method scored (None when a plan was given)
    quantize: str | None = None  # "int8": the pruned model was then quantized (dynamic int8 Linear layers)
    float_loaded: Loaded | None = None  # the pruned float model before quantization (keep_float=True)
    cost_model: dict | None = None      # with a target: the cost model the plan was allocated under


def copy_loaded(loaded: Loaded) -> Loaded:
    return Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.kind, loaded.spec, dict(loaded.info))


def needs_calibration(req: PruneRequest) -> bool:
    """Whether the request needs calibration texts (scores from data, or a compensation)."""
    if req.plan is not None:
        return compensation_recipe(req.plan, req.compensate) is not None
    return req.compensate or get_scorer(req.method).needs_data or bool(req.layerwise)


def prune_step(calib: Calibration, req: PruneRequest, *, inplace: bool = False, keep_float: bool = False
               ) -> PruneResult:
    """Prune the calibration sample's model as `req` asks (a method, a target or a plan); see the module doc.

    Statistics are cached on `calib`, so a sweep computes each once. keep_float: with req.quantize, also
    return the float pruned model (what a saved folder stores)."""
    loaded = calib.loaded
    quantize = check_quantize(req.quantize, loaded.device)
    if quantize and loaded.dtype != "float32":
        raise UserError(f"--quantize {quantize} runs in float32 around its int8 matrix multiplies; leave --dtype out")
    method, plan, target = req.method, req.plan, req.target
    work = loaded if inplace else copy_loaded(loaded)
    scores = cost_model = None
    with calib.charged() as cost:
        if plan is None and target is not None:
            scores = get_scorer(method).run(calib, None, check_params(method, req.scorer_params(heads=True)))
            plan, cost_model = _plan_for_target(loaded, scores, target, method, calib.seed)
        elif plan is None:
            scores = score(method, calib, req.sparsity, **req.scorer_params())
            plan = plan_from_scores(scores, req.sparsity, allocation=req.allocation_override(), base_model=loaded.base_spec,
                                    method=method, seed=calib.seed if scores.seed is None else scores.seed)
        plan.check_fits(loaded.model)
        recipe = compensation_recipe(plan, req.compensate)
        report = None
        if recipe is not None:
            with_heads = plan.heads is not None
            stats = calibration_pass(calib, grads=recipe["own"] or with_heads, heads=with_heads)
            full = refit(work.model, plan, stats.ffn, ridge=recipe["ridge"], readout_mix=recipe["readout_mix"])
            report = {k: v for k, v in full.items() if k != "layers"}
            if with_heads:
                h = compensate_heads(work.model, plan, stats.heads, ridge=recipe["ridge"])
                report.update(heads_rel_err_removed=h["mean_rel_err_removed"],
                              heads_rel_err_compensated=h["mean_rel_err_compensated"])
    apply_plan(work.model, plan, req.mode)
    log.info("%s: removed %d of %d FFN neurons (%.1f%%) in %.1f s", plan.method or "plan", plan.neurons_removed,
             sum(plan.widths), 100 * plan.sparsity, cost["seconds"])
    float_loaded = None
    if quantize:
        float_loaded = copy_loaded(work) if keep_float else None
        work = Loaded(quantize_int8(work.model), work.tokenizer, work.kind, work.spec,
                      {**work.info, "quantize": quantize}, dtype=work.dtype)
    return PruneResult(work, plan, report, cost["seconds"], scores, quantize, float_loaded, cost_model)


def _plan_for_target(loaded: Loaded, scores, target: dict, method: str, seed: int) -> tuple[PruningPlan, dict]:
    """The joint plan of neurons and heads under the target's budget, and the cost model (as a dict)."""
    if "flops" in target:
        cm = flops_cost(loaded, seq_len=target["seq_len"])
        budget, what = cm.dense * float(target["flops"]), f"--target-flops {target['flops']}"
    else:
        cm = latency_cost(loaded, batch_size=target["batch_size"], seq_len=target["seq_len"])
        budget, what = cm.dense / float(target["speedup"]), f"--target-speedup {target['speedup']}"
    plan = plan_under_budget(scores, {"neurons": cm.per_neuron, "heads": cm.per_head}, cm.base, budget,
                             floor=float(target["floor"]), what=what,
                             fields={"base_model": loaded.base_spec, "method": method, "seed": seed,
                                     "params": {"target": target, "cost_kind": cm.kind}})
    return plan, {**cm.to_dict(), "budget": budget, "predicted": cm.predict(plan.kept_widths, plan.kept_heads)}
