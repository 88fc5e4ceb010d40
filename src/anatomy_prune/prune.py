"""`anatomy-prune prune`: load -> calibration sample -> plan -> (compensation) -> apply -> evaluate -> save.

The output folder DIR (written atomically: nothing half-written on failure) holds
  plan.json      the PruningPlan (JSON; base model, method, parameters, seed)
  model/         the pruned model (io.save_model), so DIR is itself a model spec for every command
  metrics.json   accuracy (classifier) or perplexity (causal LM), latency_s, n_eval, neurons removed in total
                 and per layer, params, flops_per_token, sparsity, method, mode, prune_s, peak_mem_mb, ...

Calibration data: a pinned, seeded sample of IMDB *training-split* reviews (the 20,000-review train split
of `data.DEFAULT_SIZES` shuffled with seed 0, which never holds a test review), any evaluation text removed
from it; the same for causal LMs, whose evaluation text comes from `data.lm_texts` (another seed).
"""
from __future__ import annotations

import logging
import random
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

from .apply import MODES, apply_plan
from .data import DEFAULT_SIZES, TextSet, eval_set, lm_texts, load_splits, read_texts
from .errors import UserError
from .evaluate import evaluate_classifier, perplexity, size_report
from .io import atomic_dir, now_iso, save_model, write_json
from .methods import Calibration, get_method, make_plan
from .models import Loaded, load_model
from .plan import PruningPlan, check_sparsity

log = logging.getLogger(__name__)

CALIB_SIZE = 256        # reviews: enough for stable means, small enough for memory and time on a CPU
CALIB_MAX_LENGTH = 128  # tokens per calibration review (the model maximum would blow up memory)
LM_EVAL_SEED = 1        # data.lm_texts' default seed: the causal-LM evaluation texts


# --- inputs ---------------------------------------------------------------------------------------

def calibration_set(n: int = CALIB_SIZE, seed: int = 0, source: str = "imdb",
                    exclude: Sequence[str] = ()) -> TextSet:
    """`n` calibration texts: a seeded sample of IMDB training-split reviews (with labels), or the first
    lines of a text file (labels unknown, set to -1). Texts in `exclude` (the evaluation set) are left out."""
    if n <= 0:
        raise UserError(f"--calib-size must be positive, got {n}")
    banned = set(exclude)
    if source == "imdb":
        train = load_splits("imdb", DEFAULT_SIZES, seed=0).train
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        ids = [i for i in order if train.texts[i] not in banned][:n]
        if len(ids) < n:
            raise UserError(f"--calib-size {n} is above the {len(ids)} training reviews available")
        return TextSet([train.texts[i] for i in ids], [train.labels[i] for i in ids])
    texts = [t for t in read_texts(source) if t not in banned][:n]
    if not texts:
        raise UserError(f"calibration file '{source}' has no text outside the evaluation set; give other texts")
    return TextSet(texts, [-1] * len(texts))


def make_calibration(loaded: Loaded, n: int = CALIB_SIZE, max_length: int = CALIB_MAX_LENGTH, seed: int = 0,
                     source: str = "imdb", exclude: Sequence[str] = (), batch_size: int = 16) -> Calibration:
    if max_length <= 0:
        raise UserError(f"--calib-max-length must be positive, got {max_length}")
    max_length = min(max_length, loaded.max_positions)
    cal = calibration_set(n, seed, source, exclude)
    labels = cal.labels if loaded.kind == "classifier" and min(cal.labels, default=0) >= 0 else None
    return Calibration(loaded, cal.texts, labels, max_length=max_length, batch_size=batch_size, seed=seed)


def eval_max_length(loaded: Loaded, given: int | None) -> int:
    """As given, else the fine-tune's max length, else 256; never above the model's positions."""
    if given is not None:
        return int(given)
    ft = loaded.info.get("max_length") or loaded.info.get("finetune", {}).get("max_length") or 256
    return min(int(ft), loaded.max_positions)


def evaluation_data(loaded: Loaded, data: str = "imdb", eval_size: int = 1000) -> TextSet:
    """The test reviews of a classifier, or held-out text (labels -1) for a causal LM's perplexity."""
    if eval_size is not None and eval_size <= 0:
        raise UserError(f"--eval-size must be positive, got {eval_size}")
    if loaded.kind == "classifier":
        return eval_set(data, eval_size)
    if loaded.kind == "causal-lm":
        texts = lm_texts(data, eval_size, seed=LM_EVAL_SEED)
        return TextSet(texts, [-1] * len(texts))
    raise UserError(f"model '{loaded.spec}' has no classification head and is not a causal LM, so a pruned copy "
                    f"cannot be evaluated; fine-tune it first: anatomy-prune finetune --model {loaded.spec}")


def evaluate_loaded(loaded: Loaded, data: TextSet, batch_size: int = 32, max_length: int | None = None,
                    progress: bool = True) -> dict:
    """Accuracy (classifier) or perplexity (causal LM) with latency; `n_eval` texts either way."""
    length = eval_max_length(loaded, max_length)
    if loaded.kind == "classifier":
        return evaluate_classifier(loaded, data, batch_size, length, progress=progress)
    out = perplexity(loaded, data.texts, max_length=length, batch_size=max(1, batch_size // 4), progress=progress)
    out["n_eval"] = len(data)
    return out


def metric_name(kind: str) -> str:
    return "accuracy" if kind == "classifier" else "perplexity"


def peak_mem_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# --- compensation (issue 7's module, optional) ----------------------------------------------------

def compensation_functions():
    """(ffn_input_stats, compensate) from anatomy_prune.compensate, or a UserError if it is not there."""
    try:
        from .compensate import compensate, ffn_input_stats
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("compensate"):
            raise UserError("compensation is not available in this version (anatomy_prune.compensate is missing); "
                            "run without --compensate") from None
        raise
    return ffn_input_stats, compensate


def wants_compensation(plan: PruningPlan, compensate: bool) -> bool:
    """--compensate, a method whose recipe includes it (`calibrated` sets plan.params["compensate"]), or a
    plan file made with compensation (plan.params["compensated"]: applying it again compensates again)."""
    return bool(compensate or plan.params.get("compensate") or plan.params.get("compensated"))


def run_compensation(loaded: Loaded, calib: Calibration, plan: PruningPlan, model=None) -> dict:
    """Refit `model`'s (default: loaded.model, unpruned) kept down-projection columns and bias in place, from
    calibration statistics of the unpruned `loaded` model (computed once per Calibration). Returns the
    compensation's diagnostics. Gradients are collected only when the plan's method asked for compensation
    itself (its statistics then come from the same cached pass)."""
    ffn_input_stats, refit = compensation_functions()
    own = bool(plan.params.get("compensate"))
    key = "ffn_input_stats" + ("" if own else "_nograd")
    stats = calib.cached(key, lambda: ffn_input_stats(loaded, calib) if own else
                         ffn_input_stats(loaded, calib, grads=False))
    kw = {"ridge": plan.params["ridge"]} if "ridge" in plan.params else {}
    report = refit(loaded.model if model is None else model, plan, stats, **kw) or {}
    plan.params["compensated"] = True
    return {k: v for k, v in report.items() if k != "layers"} if isinstance(report, dict) else {}


def plan_and_compensate(loaded: Loaded, calib: Calibration, method: str | None, sparsity: float | None,
                        params: dict, compensate: bool, plan: PruningPlan | None = None
                        ) -> tuple[PruningPlan, float, dict | None]:
    """Make the plan (or take the given one) and, if asked, compensate in place (before the plan is
    applied). Returns the plan, the seconds it took (statistics included) and the compensation report."""
    start = time.perf_counter()
    if plan is None:
        plan = make_plan(method, calib, sparsity, **params)
    else:
        plan.check_fits(loaded.model)
    report = run_compensation(loaded, calib, plan) if wants_compensation(plan, compensate) else None
    return plan, time.perf_counter() - start, report


# --- the command ------------------------------------------------------------------------------------

def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


def prune(model: str, out: str | Path, method: str | None = None, sparsity: float | None = None,
          params: dict | None = None, mode: str = "mask", plan_file: str | Path | None = None,
          compensate: bool = False, calib_size: int = CALIB_SIZE, calib_max_length: int = CALIB_MAX_LENGTH,
          calib_data: str = "imdb", data: str = "imdb", eval_size: int = 1000, batch_size: int = 32,
          max_length: int | None = None, seed: int = 0, device: str | None = None, progress: bool = True) -> dict:
    """Prune `model` with a registered `method` (or apply the plan in `plan_file`) and write `out`.

    Returns the metrics written to `out/metrics.json`.
    """
    params = dict(params or {})
    # every check that needs no model comes first, so bad input costs nothing and writes nothing
    check_mode(mode)
    if (method is None) == (plan_file is None):
        raise UserError("give either --method or --plan")
    given_plan = PruningPlan.load(plan_file) if plan_file else None
    if method is not None:
        m = get_method(method)
        unknown = set(params) - set(m.params)
        if unknown:
            raise UserError(f"method '{method}' has no parameter(s) {sorted(unknown)}; it takes {sorted(m.params)}")
        if sparsity is None and m.needs_sparsity:
            raise UserError(f"method '{method}' needs --sparsity (the fraction of FFN neurons to remove, in [0, 1))")
    if sparsity is not None:
        check_sparsity(sparsity)
    if compensate:
        compensation_functions()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a folder; choose another --out")

    loaded = load_model(model, device=device)
    eval_data = evaluation_data(loaded, data, eval_size)
    needs_data = (wants_compensation(given_plan, compensate) if given_plan is not None
                  else compensate or get_method(method).needs_data)
    calib = make_calibration(loaded, calib_size, calib_max_length, seed, calib_data, exclude=eval_data.texts) \
        if needs_data else Calibration(loaded, [], seed=seed, max_length=calib_max_length)
    plan, prune_s, comp = plan_and_compensate(loaded, calib, method, sparsity, params, compensate, given_plan)
    apply_plan(loaded.model, plan, mode)
    log.info("%s: removed %d of %d FFN neurons (%.1f%%) in %.1f s; evaluating on %d texts", plan.method or "plan",
             plan.neurons_removed, sum(plan.widths), 100 * plan.sparsity, prune_s, len(eval_data))
    result = evaluate_loaded(loaded, eval_data, batch_size, max_length, progress)
    metrics = {metric_name(loaded.kind): result.get("accuracy", result.get("perplexity")),
               **{k: v for k, v in result.items() if k not in ("accuracy", "perplexity")},
               "neurons_removed": plan.neurons_removed, "neurons_removed_per_layer": plan.removed_per_layer,
               **size_report(loaded), "sparsity": plan.sparsity, "target_sparsity": sparsity,
               "method": plan.method, "plan_params": plan.params, "mode": mode, "compensated": comp is not None,
               "compensation": comp,
               "prune_s": prune_s, "calib_size": len(calib.texts), "calib_max_length": calib.max_length,
               "calib_data": calib_data if needs_data else None, "seed": seed, "model": model,
               "base_model": loaded.base_spec, "data": data, "created": now_iso()}
    with atomic_dir(out) as tmp:
        plan.save(tmp / "plan.json")
        save_model(loaded, tmp / "model", plan=plan, pruned={"method": plan.method, "mode": mode,
                                                              "sparsity": plan.sparsity, "compensated": comp is not None})
        metrics["peak_mem_mb"] = peak_mem_mb()
        write_json(tmp / "metrics.json", metrics)
    return metrics
