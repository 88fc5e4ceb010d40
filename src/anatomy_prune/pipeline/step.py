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

from ..apply.compensate import check_recipe, compensate as refit
from ..apply.modes import apply_plan, check_mode
from ..errors import UserError
from ..models.loading import Loaded
from ..models.quantize import check_quantize, quantize_int8
from ..plan.allocate import plan_from_scores
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


def check_request(method: str | None, sparsity: float | None, params: dict | None, plan: PruningPlan | None) -> None:
    """Every check of a pruning request that needs no model, so bad input fails before anything is loaded."""
    if (method is None) == (plan is None):
        raise UserError("give either a method (--method) or a plan (--plan)")
    if sparsity is not None:
        check_sparsity(sparsity)
    if method is not None:
        check_params(method, dict(params or {}))
        if sparsity is None and get_scorer(method).needs_sparsity:
            raise UserError(f"method '{method}' needs --sparsity (the fraction of FFN neurons to remove, in [0, 1))")


def needs_calibration(method: str | None, plan: PruningPlan | None, compensate_requested: bool) -> bool:
    if plan is not None:
        return compensation_recipe(plan, compensate_requested) is not None
    return compensate_requested or get_scorer(method).needs_data


def prune_step(loaded: Loaded, calib: Calibration, method: str | None = None, *, sparsity: float | None = None,
               params: dict | None = None, plan: PruningPlan | None = None, allocation: dict | None = None,
               compensate: bool = False, mode: str = "physical", inplace: bool = False,
               quantize: str | None = None, keep_float: bool = False) -> PruneResult:
    """Prune `loaded` with a registered method (or apply a given plan); see the module doc.

    Statistics come from `calib` (a sample for `loaded`, the unpruned model); they are cached there, so a
    sweep computes each once. `allocation` overrides the method's own (e.g. {"kind": "global"}).
    quantize="int8" stacks dynamic int8 quantization on the pruned model (CPU; models.quantize); keep_float
    also returns the float pruned model (what a saved folder stores)."""
    check_mode(mode)
    quantize = check_quantize(quantize, loaded.device)
    if quantize and loaded.dtype != "float32":
        raise UserError(f"--quantize {quantize} runs in float32 around its int8 matrix multiplies; leave --dtype out")
    check_request(method, sparsity, params, plan)
    if calib.loaded.model is not loaded.model:
        raise ValueError("the calibration sample belongs to another model")
    work = loaded if inplace else copy_loaded(loaded)
    scores = None
    with calib.charged() as cost:
        if plan is None:
            scores = score(method, calib, sparsity, **dict(params or {}))
            plan = plan_from_scores(scores, sparsity, allocation=allocation, base_model=loaded.base_spec,
                                    method=method, seed=calib.seed if scores.seed is None else scores.seed)
        plan.check_fits(loaded.model)
        recipe = compensation_recipe(plan, compensate)
        report = None
        if recipe is not None:
            stats = ffn_input_stats(loaded, calib, grads=recipe["own"])  # of the unpruned model, cached
            full = refit(work.model, plan, stats, ridge=recipe["ridge"], readout_mix=recipe["readout_mix"])
            report = {k: v for k, v in full.items() if k != "layers"}
    apply_plan(work.model, plan, mode)
    log.info("%s: removed %d of %d FFN neurons (%.1f%%) in %.1f s", plan.method or "plan", plan.neurons_removed,
             sum(plan.widths), 100 * plan.sparsity, cost["seconds"])
    float_loaded = None
    if quantize:
        float_loaded = copy_loaded(work) if keep_float else None
        work = Loaded(quantize_int8(work.model), work.tokenizer, work.kind, work.spec,
                      {**work.info, "quantize": quantize}, dtype=work.dtype)
    return PruneResult(work, plan, report, cost["seconds"], scores, quantize, float_loaded)
