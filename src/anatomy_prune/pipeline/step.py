"""The pruning step: calibration statistics -> scores -> plan -> (compensation) -> applied model (-> tuning).

One function, `prune_step(calib, req)`, serves the `prune` command, sweeps, every benchmark and the
notebooks: a calibration sample (which knows its model) and a PruneRequest in; the pruned model (a copy
unless `inplace`), the plan, the compensation report and the seconds out. Nothing is recorded on the model.
The scorer only scores; the request's allocation and compensation, over the method's defaults
(pipeline.allocation.resolve), make the plan and the recipe. A recipe with `tune` then refits the applied
model's output projections toward the unpruned model's residual stream (apply.tune).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from ..apply.compensate import compensate as refit, compensate_heads
from ..apply.modes import apply_plan
from ..apply.tune import TUNE_RIDGE, tune_outputs
from ..errors import UserError
from ..models.dispatched import is_dispatched
from ..models.families import head_counts
from ..models.loading import Loaded
from ..models.quantize import check_quantize, quantize_int8
from ..plan.allocate import plan_from_scores
from ..plan.plan import PruningPlan
from ..scores.calibration import Calibration, calibration_pass
from ..scores.registry import Scores, check_params, get_scorer
from .allocation import Resolved, resolve
from .compensation import compensation_recipe
from .requests import PruneRequest
from .target import plan_for_target

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
    recipe: dict | None = None          # the compensation recipe (None: none); its `tune` says whether tuned


def copy_loaded(loaded: Loaded) -> Loaded:
    return Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.kind, loaded.spec, dict(loaded.info))


def needs_calibration(req: PruneRequest) -> bool:
    """Whether the request needs calibration texts (scores from data, or a compensation)."""
    if req.plan is not None:
        return compensation_recipe(req.plan, req.compensation) is not None
    return req.compensation is not None or get_scorer(req.method).needs_data or bool(req.layerwise)


def plan_step(calib: Calibration, req: PruneRequest) -> tuple[PruningPlan, Scores | None, dict | None, dict | None]:
    """The plan `req` asks for (a method at a sparsity or a target, or its plan) and how to compensate it:
    (plan, scores or None, recipe or None, cost model of a target or None). Nothing is applied."""
    loaded, method = calib.loaded, req.method
    if req.plan is not None:
        return req.plan, None, compensation_recipe(req.plan, req.compensation), None
    given = req.scorer_params(heads=req.target is not None)
    empty = [i for i, n in enumerate(head_counts(loaded.model)) if n == 0] if given.get("heads") else []
    if empty:
        raise UserError(f"layer {empty[0]} of this model has no attention head left (pruned before), and heads cannot "
                        "be scored there; prune it with --sparsity (FFN neurons only), or start from the dense model")
    params = check_params(method, given)
    scores = get_scorer(method).run(calib, req.sparsity, params)
    how = resolve(method, params, req.sparsity, req.allocation, req.compensation, readout=loaded.kind == "classifier",
                  causal=loaded.kind == "causal-lm" and not is_dispatched(loaded.model))   # tuning keeps a dense copy
    cost_model = None
    if req.target is not None:
        plan, cost_model = plan_for_target(loaded, scores, req.target, how.allocation, (method, calib.seed))
    else:
        plan = plan_from_scores(scores, req.sparsity, allocation=how.allocation, base_model=loaded.base_spec,
                                method=method, seed=calib.seed if scores.seed is None else scores.seed)
    return _recorded(plan, how), scores, how.recipe, cost_model


def _recorded(plan: PruningPlan, how: Resolved) -> PruningPlan:
    """The plan with what the request's resolution records (the method's recipe, an automatic floor)."""
    return plan.with_info(params={**plan.params, **how.record}) if how.record else plan


def prune_step(calib: Calibration, req: PruneRequest, *, inplace: bool = False, keep_float: bool = False,
               tune: bool = True) -> PruneResult:
    """Prune the calibration sample's model as `req` asks (a method, a target or a plan); see the module doc.

    Statistics are cached on `calib`, so a sweep computes each once. keep_float: with req.quantize, also
    return the float pruned model (what a saved folder stores). tune=False leaves a recipe's output tuning to
    the caller (iterative pruning tunes once, at the end, toward the dense model)."""
    loaded = calib.loaded
    quantize = check_quantize(req.quantize, loaded.device)
    if quantize and loaded.dtype != "float32":
        raise UserError(f"--quantize {quantize} runs in float32 around its int8 matrix multiplies; leave --dtype out")
    work = loaded if inplace else copy_loaded(loaded)
    with calib.charged() as cost:
        plan, scores, recipe, cost_model = plan_step(calib, req)
        plan.check_fits(loaded.model)
        tuning = tune and bool(recipe and recipe.get("tune"))
        if tuning and is_dispatched(loaded.model):
            raise UserError("--tune refits toward a dense copy held beside the pruned model; a model placed by "
                            "--device-map has no room for one: leave --tune out")
        dense = copy_loaded(loaded) if tuning and inplace else loaded     # the reference the tuning refits toward
        report = None if recipe is None else compensate_with(work.model, plan, calib, recipe)
        apply_plan(work.model, plan, req.mode)
        if tuning:
            report = {**(report or {}), "tune": tune_with(work, dense, calib, recipe)}
    log.info("%s: removed %d of %d FFN neurons (%.1f%%) in %.1f s", plan.method or "plan", plan.neurons_removed,
             sum(plan.widths), 100 * plan.sparsity, cost["seconds"])
    float_loaded = None
    if quantize:
        float_loaded = copy_loaded(work) if keep_float else None
        work = Loaded(quantize_int8(work.model, quantize), work.tokenizer, work.kind, work.spec,
                      {**work.info, "quantize": quantize}, dtype=work.dtype)
    return PruneResult(work, plan, report, cost["seconds"], scores, quantize, float_loaded, cost_model, recipe)


def tune_with(work: Loaded, dense: Loaded, calib: Calibration, recipe: dict) -> dict:
    """Tune `work`'s output projections toward `dense` with the tuning's own ridge (apply.tune.TUNE_RIDGE; the
    recipe's ridge is the within-layer refit's); returns apply.tune's report without its per-sublayer list: the
    ridge and the mean residual error before and after the refits."""
    report = tune_outputs(work, dense, calib, TUNE_RIDGE)
    subs = [e for e in report["sublayers"] if "rel_err_after" in e]
    mean = lambda k: sum(e[k] for e in subs) / max(1, len(subs))  # noqa: E731
    return {"sublayers": len(subs), "ridge": report["ridge"], "mean_rel_err_before": mean("rel_err_before"),
            "mean_rel_err_after": mean("rel_err_after"), "seconds": report["seconds"]}


def compensate_with(model, plan: PruningPlan, calib: Calibration, recipe: dict) -> dict:
    """Compensate the unpruned `model` for what `plan` removes, in place, as `recipe` says (kind refit: ridge
    least squares, heads too where the plan removes some; bias: means into biases); returns the summary."""
    with_heads = plan.heads is not None
    stats = calibration_pass(calib, grads=recipe["own"] or with_heads, heads=with_heads)
    if recipe["kind"] == "bias":
        from ..apply.bias import bias_compensate   # FLAP's bias compensation (apply/bias.py)
        return {k: v for k, v in bias_compensate(model, plan, stats).items() if k != "layers"}
    full = refit(model, plan, stats.ffn, ridge=recipe["ridge"], readout_mix=recipe["readout_mix"])
    report = {k: v for k, v in full.items() if k != "layers"}
    if with_heads:
        h = compensate_heads(model, plan, stats.heads, ridge=recipe["ridge"])
        report.update(heads_rel_err_removed=h["mean_rel_err_removed"],
                      heads_rel_err_compensated=h["mean_rel_err_compensated"])
    return report
