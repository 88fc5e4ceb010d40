"""`anatomy-prune prune`: load -> calibration sample -> prune_step -> evaluate -> run folder.

The output folder DIR (see runfolder.RunFolder: nothing half-written, nothing outside it touched) holds
  plan.json      the PruningPlan (JSON; base model, method, parameters, seed)
  model/         the pruned model (models.saved), so DIR is itself a model spec for every command
  metrics.json   accuracy (classifier) or perplexity (causal LM), latency_s, n_eval, neurons removed in total
                 and per layer, params, flops_per_token, sparsity, method, mode, prune_s, peak_mem_mb, ...

Calibration data: a pinned, seeded sample of IMDB *training-split* reviews (data.calibration_set), any
evaluation text removed from it; the same for causal LMs, whose evaluation text comes from data.lm_texts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.splits import CALIB_SIZE
from ..evaluate.counts import size_report
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.timing import peak_mem_mb
from ..models.loading import load_model
from ..models.saved import save_model
from ..plan.plan import PruningPlan
from ..runfolder import RunFolder, now_iso
from ..scores.calibration import CALIB_MAX_LENGTH, Calibration, make_calibration
from .step import check_request, needs_calibration, prune_step
from ..apply.modes import check_mode

log = logging.getLogger(__name__)


def prune(model: str, out: str | Path, method: str | None = None, sparsity: float | None = None,
          params: dict | None = None, mode: str = "mask", plan_file: str | Path | None = None,
          compensate: bool = False, calib_size: int = CALIB_SIZE, calib_max_length: int = CALIB_MAX_LENGTH,
          calib_data: str | None = None, data: str = "imdb", eval_size: int = 1000, split: str = "test", batch_size: int = 32,
          max_length: int | None = None, seed: int = 0, device: str | None = None, progress: bool = True,
          force: bool = False, dtype: str | None = None, quantize: str | None = None) -> dict:
    """Prune `model` with a registered `method` (or apply the plan in `plan_file`) and write `out`.

    Returns the metrics written to `out/metrics.json`. Every check that needs no model runs first, and the
    output folder is made (and checked writable) before the model is loaded."""
    params = dict(params or {})
    check_mode(mode)
    calib_data = calib_data or (data if data in ("imdb", "hf") else "imdb")
    given = PruningPlan.load(plan_file) if plan_file else None
    check_request(method, sparsity, params, given)
    settings = dict(model=model, method=method, sparsity=sparsity, params=params, mode=mode,
                    plan=given.to_dict() if given else None, compensate=compensate, calib_size=calib_size,
                    calib_max_length=calib_max_length, calib_data=calib_data, data=data, eval_size=eval_size, split=split,
                    batch_size=batch_size, max_length=max_length, seed=seed, quantize=quantize)
    with RunFolder(out, "prune", settings, force=force) as rf:
        loaded = load_model(model, device=device, dtype=dtype)
        eval_data = evaluation_set(loaded, data, eval_size, split)
        needs_data = needs_calibration(method, given, compensate)
        calib = make_calibration(loaded, calib_size, calib_max_length, seed, calib_data, exclude=eval_data.texts) \
            if needs_data else Calibration(loaded, [], seed=seed, max_length=calib_max_length)
        res = prune_step(loaded, calib, method, sparsity=sparsity, params=params, plan=given, compensate=compensate,
                         mode=mode, inplace=True, quantize=quantize, keep_float=True)
        plan = res.plan
        log.info("evaluating on %d texts", len(eval_data))
        result = evaluate(res.loaded, eval_data, batch_size, max_length, progress)
        metric = metric_name(loaded.kind)
        metrics = {metric: result[metric], **{k: v for k, v in result.items() if k != metric},
                   "neurons_removed": plan.neurons_removed, "neurons_removed_per_layer": plan.removed_per_layer,
                   **size_report(res.loaded), "sparsity": plan.sparsity, "target_sparsity": sparsity,
                   "method": plan.method, "plan_params": plan.params, "mode": mode,
                   "compensated": res.compensation is not None, "compensation": res.compensation,
                   "prune_s": res.prune_s, "quantize": res.quantize, "calib_size": len(calib.texts), "calib_max_length": calib.max_length,
                   "calib_data": calib_data if needs_data else None, "seed": seed, "model": model,
                   "base_model": loaded.base_spec, "data": data, "split": split, "created": now_iso()}
        plan.save(rf.stage("plan.json"))
        save_model(res.float_loaded or res.loaded, rf.stage("model"), plan=plan.to_dict(), quantize=res.quantize,
                   pruned={"method": plan.method, "mode": mode, "sparsity": plan.sparsity,
                           "compensated": res.compensation is not None},
                   max_length=result.get("max_length"))
        metrics["peak_mem_mb"] = peak_mem_mb()
        rf.write_json("metrics.json", metrics)
    return metrics
