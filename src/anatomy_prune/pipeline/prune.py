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
from ..errors import UserError
from ..evaluate.counts import flops_per_token, size_report
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.timing import peak_mem_mb
from ..models.loading import load_model
from ..models.offload import Placement, parse_size
from ..models.saved import save_model
from ..plan.plan import PruningPlan
from ..runfolder import RunFolder, now_iso
from ..scores.calibration import CALIB_MAX_LENGTH, Calibration, make_calibration
from .layerwise import check_layerwise, prune_layerwise
from .step import check_request, check_sizes, compensation_recipe, copy_loaded, needs_calibration, prune_step
from ..apply.modes import check_mode

log = logging.getLogger(__name__)


def prune(model: str, out: str | Path, method: str | None = None, sparsity: float | None = None,
          params: dict | None = None, mode: str = "mask", plan_file: str | Path | None = None,
          compensate: bool = False, calib_size: int = CALIB_SIZE, calib_max_length: int = CALIB_MAX_LENGTH,
          calib_data: str | None = None, data: str = "imdb", eval_size: int = 1000, split: str = "test", batch_size: int = 32,
          max_length: int | None = None, seed: int = 0, device: str | None = None, progress: bool = True,
          force: bool = False, dtype: str | None = None, quantize: str | None = None, *,
          layerwise: str | None = None, device_map: str | None = None, max_memory: str | None = None,
          offload_folder: str | None = None, weights_dtype: str | None = None,
          max_shard_size: str | None = None, target: dict | None = None) -> dict:
    """Prune `model` with a registered `method` (or apply the plan in `plan_file`) and write `out`.

    Returns the metrics written to `out/metrics.json`. Every check that needs no model runs first, and the
    output folder is made (and checked writable) before the model is loaded.

    Big models: `layerwise` ("sequential" or "dense") prunes block by block (pipeline.layerwise; method
    calibrated, mode physical); device_map / max_memory / offload_folder / weights_dtype place the model
    (models.offload.Placement); max_shard_size writes the saved weights in shards."""
    params = dict(params or {})
    check_mode(mode)
    calib_data = calib_data or (data if data in ("imdb", "hf") else "imdb")
    given = PruningPlan.load(plan_file) if plan_file else None
    check_request(method, sparsity, params, given, target)
    check_sizes(calib_size=calib_size, calib_max_length=calib_max_length, batch_size=batch_size,
                max_length=max_length, eval_size=eval_size)
    if given is not None:
        compensation_recipe(given, compensate)  # a plan's ridge / readout_mix, checked before anything is loaded
    big = _check_big(layerwise, method, params, mode, given, quantize, sparsity, device_map, max_memory,
                     offload_folder, weights_dtype, max_shard_size)
    settings = dict(model=model, method=method, sparsity=sparsity, params=params, mode=mode,
                    plan=given.to_dict() if given else None, compensate=compensate, calib_size=calib_size,
                    calib_max_length=calib_max_length, calib_data=calib_data, data=data, eval_size=eval_size, split=split,
                    batch_size=batch_size, max_length=max_length, seed=seed, quantize=quantize, target=target, **big)
    with RunFolder(out, "prune", settings, force=force) as rf:
        loaded = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                            offload_folder=offload_folder, weights_dtype=weights_dtype, layerwise=bool(layerwise))
        eval_data = evaluation_set(loaded, data, eval_size, split)
        needs_data = needs_calibration(method, given, compensate) or bool(layerwise)
        calib = make_calibration(loaded, calib_size, calib_max_length, seed, calib_data, exclude=eval_data.texts) \
            if needs_data else Calibration(loaded, [], seed=seed, max_length=calib_max_length)
        dense_copy = None
        if layerwise:
            res = prune_layerwise(loaded, calib, sparsity, params=params, sequential=layerwise == "sequential",
                                  inplace=True, offload_folder=offload_folder, progress=progress)
        else:
            dense_copy = copy_loaded(loaded) if (target or quantize) else None  # for the measured speedup
            res = prune_step(loaded, calib, method, sparsity=sparsity, params=params, plan=given,
                             compensate=compensate, mode=mode, inplace=True, quantize=quantize, keep_float=True,
                             target=target)
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
                   max_length=result.get("max_length"),
                   max_shard_size=parse_size(max_shard_size, "--max-shard-size") if max_shard_size else None)
        if res.cost_model is not None:
            rf.write_json("cost_model.json", res.cost_model)
            metrics["target"] = target
        if dense_copy is not None:  # a target or int8: how much faster it really is, on this device
            shape = (target or {}).get("batch_size", 32), (target or {}).get("seq_len", 128)
            metrics.update(measure_speedup(dense_copy, res.loaded, *shape))
            metrics["flops_ratio"] = metrics["flops_per_token"] / flops_per_token(dense_copy.model)
        metrics["heads_removed"] = plan.heads_removed if plan.heads is not None else 0
        metrics["peak_mem_mb"] = peak_mem_mb()
        rf.write_json("metrics.json", metrics)
    return metrics


def _check_big(layerwise, method, params, mode, given, quantize, sparsity, device_map, max_memory, offload_folder,
               weights_dtype, max_shard_size) -> dict:
    """The big-model options' checks that need no model; returns the ones given (for the run's settings)."""
    if layerwise is not None:
        if given is not None or quantize:
            raise UserError("--layerwise makes its own plan and keeps float weights; leave out --plan and --quantize")
        if sparsity is None:
            raise UserError("--layerwise needs --sparsity (the fraction of each block's FFN neurons to remove)")
        check_layerwise(method, params, mode, layerwise)
    Placement.make(device_map, max_memory, offload_folder, weights_dtype, bool(layerwise))
    if max_shard_size is not None:
        parse_size(max_shard_size, "--max-shard-size")
    given_opts = dict(layerwise=layerwise, device_map=device_map, max_memory=max_memory,
                      offload_folder=offload_folder, weights_dtype=weights_dtype, max_shard_size=max_shard_size)
    return {k: v for k, v in given_opts.items() if v is not None}


def measure_speedup(dense, pruned, batch_size: int = 32, seq_len: int = 128, repeats: int = 5) -> dict:
    """Dense and pruned models timed interleaved on fixed inputs of the target's shape: the measured speedup
    (ratio of medians) with the round-by-round ratios' quartiles."""
    from ..evaluate.timing import fixed_inputs, forward_fn, paired_speedup, time_interleaved
    from ..models.families import base_model

    vocab = int(base_model(dense.model).get_input_embeddings().num_embeddings)
    seq_len = min(seq_len, dense.max_positions)
    inputs = fixed_inputs(vocab, batch_size, seq_len, dense.device)
    t = time_interleaved({"dense": forward_fn(dense.model, inputs), "pruned": forward_fn(pruned.model, inputs)},
                         warmup=1, repeats=repeats, device=dense.device)
    sp = paired_speedup(t["dense"], t["pruned"])
    return {"measured_speedup": sp["speedup"], "speedup_paired_q1": sp["paired_q1"], "speedup_paired_q3": sp["paired_q3"],
            "speedup_shape": [batch_size, seq_len], "dense_forward_s": t["dense"].median, "pruned_forward_s": t["pruned"].median}
