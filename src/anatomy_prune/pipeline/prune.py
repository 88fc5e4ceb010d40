"""`anatomy-prune prune`: load -> calibration sample -> prune_step (or prune_layerwise, prune_iterative) ->
evaluate -> run folder.

The folder holds plan.json, model/ (the pruned model: the folder is itself a model spec) and metrics.json.
Calibration texts are a seeded sample of the training split with every evaluation text removed.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..evaluate.counts import flops_per_token, size_report
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.timing import measure_speedup, peak_mem_mb
from ..models.loading import Loaded, load_model
from ..models.offload import parse_size
from ..models.saved import save_model
from ..runfolder import RunFolder, now_iso
from ..scores.calibration import Calibration, make_calibration
from ..validate import text
from .iterative import prune_iterative
from .layerwise import prune_layerwise
from .requests import PruneRequest
from .step import PruneResult, copy_loaded, needs_calibration, prune_step

log = logging.getLogger(__name__)


def prune(req: PruneRequest, out: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Prune as `req` asks and write the run folder `out`; returns the metrics written to out/metrics.json.
    The request was checked when built; the folder is made (and checked writable) before the model loads."""
    text(req.model, "--model")  # a request for prune_step alone may leave the model out; a job names it
    with RunFolder(out, "prune", req.settings(), force=force) as rf:
        loaded = load_model(req.model, device=req.device, dtype=req.dtype, device_map=req.device_map,
                            max_memory=req.max_memory, offload_folder=req.offload_folder,
                            weights_dtype=req.weights_dtype, layerwise=bool(req.layerwise))
        eval_data = evaluation_set(loaded, req.eval.data, req.eval.size, req.eval.split)
        needs_data = needs_calibration(req)
        calib = make_calibration(loaded, req.calib.size, req.calib.max_length, req.calib.seed,
                                 req.calib.source(req.eval.data), exclude=eval_data.texts) if needs_data \
            else Calibration(loaded, [], seed=req.calib.seed, max_length=req.calib.max_length)
        dense_copy = copy_loaded(loaded) if (req.target or req.quantize) else None  # for the measured speedup
        if req.layerwise:
            res = prune_layerwise(calib, req, inplace=True, progress=progress)
        elif req.iterations > 1:
            res = prune_iterative(calib, req, inplace=True)
        else:
            res = prune_step(calib, req, inplace=True, keep_float=True)
        log.info("evaluating on %d texts", len(eval_data))
        result = evaluate(res.loaded, eval_data, req.eval.batch_size, req.eval.max_length, progress)
        metrics = _metrics(req, res, result, loaded, calib if needs_data else None)
        _save(rf, req, res, result.get("max_length"))
        if res.cost_model is not None:
            rf.write_json("cost_model.json", res.cost_model)
            metrics["target"] = req.target
        if dense_copy is not None:  # a target or int8: how much faster it really is, on this device
            t = req.target or {}
            metrics.update(measure_speedup(dense_copy, res.loaded, t.get("batch_size", 32), t.get("seq_len", 128)))
            metrics["flops_ratio"] = metrics["flops_per_token"] / flops_per_token(dense_copy.model)
        metrics["heads_removed"] = res.plan.heads_removed if res.plan.heads is not None else 0
        metrics["peak_mem_mb"] = peak_mem_mb()
        rf.write_json("metrics.json", metrics)
    return metrics


def _metrics(req: PruneRequest, res: PruneResult, result: dict, loaded: Loaded, calib: Calibration | None) -> dict:
    """metrics.json: the evaluation, what was removed, sizes, and the settings that made it."""
    plan, metric = res.plan, metric_name(loaded.kind)
    return {metric: result[metric], **{k: v for k, v in result.items() if k != metric},
            "neurons_removed": plan.neurons_removed, "neurons_removed_per_layer": plan.removed_per_layer,
            **size_report(res.loaded), "sparsity": plan.sparsity, "target_sparsity": req.sparsity,
            "method": plan.method, "plan_params": plan.params, "mode": req.mode,
            "compensated": res.compensation is not None, "compensation": res.compensation, "prune_s": res.prune_s,
            "quantize": res.quantize, "calib_size": len(calib.texts) if calib else 0,
            "calib_max_length": req.calib.max_length, "calib_data": req.calib.source(req.eval.data) if calib else None,
            "seed": req.calib.seed, "model": req.model, "base_model": loaded.base_spec, "data": req.eval.data,
            "split": req.eval.split, "created": now_iso()}


def _save(rf: RunFolder, req: PruneRequest, res: PruneResult, max_length: int | None) -> None:
    """plan.json and model/ (the float model when int8 was stacked on it)."""
    plan = res.plan
    plan.save(rf.stage("plan.json"))
    save_model(res.float_loaded or res.loaded, rf.stage("model"), plan=plan.to_dict(), quantize=res.quantize,
               pruned={"method": plan.method, "mode": req.mode, "sparsity": plan.sparsity,
                       "compensated": res.compensation is not None}, max_length=max_length,
               max_shard_size=parse_size(req.max_shard_size, "--max-shard-size") if req.max_shard_size else None)

