"""The pruning step: calibration statistics -> scores -> plan -> (compensation) -> applied model.

One function, `prune_step`, serves the `prune` command, sweeps, every benchmark and the notebooks. It takes
plain data (a loaded model, its calibration sample, a method name or a plan) and returns plain data: the
pruned model (a copy, unless `inplace`), the plan (never changed by any step), the compensation report
and the seconds it took as a standalone run would pay for them. Nothing is recorded on the model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from ..apply.compensate import check_recipe, compensate as refit, compensate_heads
from ..evaluate.cost import flops_cost, latency_cost
from ..apply.modes import apply_plan, check_mode
from ..errors import UserError
from ..models.loading import Loaded
from ..models.quantize import check_quantize, quantize_int8
from ..plan.allocate import check_allocation, plan_from_scores, plan_under_budget
from ..plan.plan import PruningPlan, check_sparsity
from ..scores.calibration import DEFAULT_RIDGE, Calibration, ffn_input_stats
from ..scores.registry import Scores, check_params, get_scorer, score

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


def compensation_recipe(plan: PruningPlan, requested: bool) -> dict | None:
    """Whether and how to compensate: the method's own recipe (plan.params: compensate, ridge, readout_mix,
    as `calibrated` records it), or plain least squares when `requested` (--compensate). Plans saved by
    older versions marked `compensated` are compensated again, as they were made."""
    p = plan.params
    own = bool(p.get("compensate")) or bool(p.get("compensated"))
    if not (own or requested):
        return None
    ridge, mix = check_recipe(p.get("ridge", DEFAULT_RIDGE), p.get("readout_mix", 0.0) if own else 0.0)
    return {"ridge": ridge, "readout_mix": mix, "own": own}


def copy_loaded(loaded: Loaded) -> Loaded:
    return Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.kind, loaded.spec, dict(loaded.info))


TARGET_METHODS = ("calibrated",)  # scorers that score neurons and heads on one scale


def check_target(target: dict | None) -> dict | None:
    """{"flops": f} (keep at most f of the dense FLOPs per token, 0 < f < 1) or {"speedup": s} (s > 1, measured
    latency at batch_size x seq_len), with optional batch_size, seq_len, floor."""
    if not target:
        return None
    t = {"batch_size": 32, "seq_len": 128, "floor": 0.0, **target}
    if ("flops" in t) == ("speedup" in t):
        raise UserError("give one target: --target-flops F or --target-speedup S")
    for k in ("batch_size", "seq_len"):
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] <= 0:
            raise UserError(f"--target-{k.replace('_', '-')} must be a positive whole number, got {t[k]}")
    if "flops" in t and not (isinstance(t["flops"], (int, float)) and 0 < float(t["flops"]) < 1):
        raise UserError(f"--target-flops must be a fraction in (0, 1) of the dense model's FLOPs, got {t['flops']}")
    if "speedup" in t and not (isinstance(t["speedup"], (int, float)) and float(t["speedup"]) > 1):
        raise UserError(f"--target-speedup must be above 1 (a speedup of the dense model), got {t['speedup']}")
    if not (isinstance(t["floor"], (int, float)) and 0 <= float(t["floor"]) < 1):
        raise UserError(f"--floor must be in [0, 1), got {t['floor']}")
    return t


def check_sizes(**sizes) -> None:
    """Whole numbers that must be positive (None: not given): --calib-size, --batch-size, --max-length, ..."""
    for name, v in sizes.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UserError(f"--{name.replace('_', '-')} must be a positive whole number, got {v}")


def check_request(method: str | None, sparsity: float | None, params: dict | None, plan: PruningPlan | None,
                  target: dict | None = None) -> None:
    """Every check of a pruning request that needs no model, so bad input fails before anything is loaded."""
    if (method is None) == (plan is None):
        raise UserError("give either a method (--method) or a plan (--plan)")
    if sparsity is not None:
        check_sparsity(sparsity)
    target = check_target(target)
    if target and (sparsity is not None or plan is not None):
        raise UserError("a target (--target-flops / --target-speedup) decides the sparsity itself; give no "
                        "--sparsity and no --plan with it")
    if target and method not in TARGET_METHODS:
        raise UserError(f"a target needs a method that scores neurons and heads on one scale: {', '.join(TARGET_METHODS)}")
    if method is not None:
        full = check_params(method, dict(params or {}))
        given = {k: full[k] for k in ("allocation", "floor", "multiple_of") if k in (params or {})}
        if given:  # allocation options fail here, before anything is loaded
            check_allocation({**({"kind": given.pop("allocation")} if "allocation" in given else {}), **given})
        if sparsity is None and not target and get_scorer(method).needs_sparsity:
            raise UserError(f"method '{method}' needs --sparsity (the fraction of FFN neurons to remove, in [0, 1))")


def needs_calibration(method: str | None, plan: PruningPlan | None, compensate_requested: bool) -> bool:
    if plan is not None:
        return compensation_recipe(plan, compensate_requested) is not None
    return compensate_requested or get_scorer(method).needs_data


def prune_step(loaded: Loaded, calib: Calibration, method: str | None = None, *, sparsity: float | None = None,
               params: dict | None = None, plan: PruningPlan | None = None, allocation: dict | None = None,
               compensate: bool = False, mode: str = "physical", inplace: bool = False,
               quantize: str | None = None, keep_float: bool = False, target: dict | None = None) -> PruneResult:
    """Prune `loaded` with a registered method (or apply a given plan); see the module doc.

    Statistics come from `calib` (a sample for `loaded`, the unpruned model); they are cached there, so a
    sweep computes each once. `allocation` overrides the method's own (e.g. {"kind": "global"}).
    quantize="int8" stacks dynamic int8 quantization on the pruned model (CPU; models.quantize); keep_float
    also returns the float pruned model (what a saved folder stores).
    target={"flops": f} or {"speedup": s, "batch_size", "seq_len"} allocates FFN neurons and attention heads
    jointly under a cost model (evaluate.cost: exact FLOPs, or latency fitted from timings on the device)."""
    check_mode(mode)
    quantize = check_quantize(quantize, loaded.device)
    if quantize and loaded.dtype != "float32":
        raise UserError(f"--quantize {quantize} runs in float32 around its int8 matrix multiplies; leave --dtype out")
    check_request(method, sparsity, params, plan, target)
    target = check_target(target)
    if calib.loaded.model is not loaded.model:
        raise ValueError("the calibration sample belongs to another model")
    work = loaded if inplace else copy_loaded(loaded)
    scores = cost_model = None
    with calib.charged() as cost:
        if plan is None and target is not None:
            scores = get_scorer(method).fn(calib, None, **check_params(method, {**dict(params or {}), "heads": True}))
            plan, cost_model = _plan_for_target(loaded, scores, target, method, calib.seed)
        elif plan is None:
            scores = score(method, calib, sparsity, **dict(params or {}))
            plan = plan_from_scores(scores, sparsity, allocation=allocation, base_model=loaded.base_spec,
                                    method=method, seed=calib.seed if scores.seed is None else scores.seed)
        plan.check_fits(loaded.model)
        recipe = compensation_recipe(plan, compensate)
        report = None
        if recipe is not None:
            with_heads = plan.heads is not None
            stats = ffn_input_stats(loaded, calib, grads=recipe["own"] or with_heads, heads=with_heads)
            full = refit(work.model, plan, stats, ridge=recipe["ridge"], readout_mix=recipe["readout_mix"])
            report = {k: v for k, v in full.items() if k != "layers"}
            if with_heads:
                h = compensate_heads(work.model, plan, stats, ridge=recipe["ridge"])
                report.update(heads_rel_err_removed=h["mean_rel_err_removed"],
                              heads_rel_err_compensated=h["mean_rel_err_compensated"])
    apply_plan(work.model, plan, mode)
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
                             floor=float(target["floor"]), base_model=loaded.base_spec, method=method, seed=seed,
                             what=what, params={"target": target, "cost_kind": cm.kind})
    return plan, {**cm.to_dict(), "budget": budget, "predicted": cm.predict(plan.kept_widths, plan.kept_heads)}
