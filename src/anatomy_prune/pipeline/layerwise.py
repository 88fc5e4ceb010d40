"""Layer-wise pruning: calibrate, score, compensate and slice a model one block at a time, so that only one
block's activations (and one FFN's Gram matrix) are held at once, and a model whose blocks sit on several
devices or on disk (models.offload) is pruned block by block on its execution device.

For block i, over the calibration batches (scores.layerwise):
  1. run the block on its stored inputs with a hook on its FFN hidden activation that sums the Gram matrix of
     [h; 1] (float64);
  2. score every neuron by the `calibrated` recipe's error term without Fisher (Fisher needs the whole
     model's loss): the error its removal leaves in the FFN output after compensation (removal_error, FLAP-style);
  3. keep the top (1 - sparsity) of the block (local allocation; optional floor, multiple_of rounding);
  4. fold the least-squares compensation of the removed neurons into the kept ones (apply.layerwise);
  5. slice the block physically and run it on the same inputs: with `sequential` (the default, as SparseGPT
     and FLAP do) its outputs are block i+1's inputs, so each block is fitted to what the pruned blocks
     before it produce; with sequential=False the dense block's outputs are, and the statistics and the plan
     equal those of the all-at-once path (ffn_input_stats without gradients -> removal_error -> local plan ->
     compensate -> physical).
Each block's reconstruction error is reported: the FFN's (plain removal and compensated, on the calibration
tokens) and the block's (pruned against dense outputs on the same inputs, relative to what the dense block
adds to its input).

Memory: the calibration inputs, the dense and the pruned outputs of one block ([tokens, d_model] each), one
FFN's Gram matrix and one covariance of its size (the scoring inverts it in place). The dense weights are
never written: the compensated down projection is built as a new, smaller tensor, so weights that map a
checkpoint file (transformers' default for safetensors) stay clean, and a replaced FFN's pages are released
(models.offload.release_mapped_pages) instead of staying resident. A block offloaded by a device map is
brought to its execution device while it is processed and offloaded again after (models.offload.onloaded).

`prune_layerwise` returns the PruneResult that pipeline.step.prune_step returns; `anatomy-prune prune
--method calibrated --layerwise` calls it.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

from torch import Tensor
from tqdm.auto import tqdm

from ..apply.compensate import check_recipe
from ..apply.layerwise import compensate_layer, slice_block_ffn
from ..errors import UserError
from ..models.families import base_model, ffn_sites, ffn_widths, get_module
from ..models.loading import Loaded
from ..models.offload import is_dispatched, onloaded, release_mapped_pages
from ..models.surgery import set_config_widths
from ..plan.allocate import check_allocation, keep_counts, select
from ..plan.plan import PruningPlan, check_sparsity
from ..scores.calibration import DEFAULT_RIDGE, Calibration
from ..scores.layerwise import block_ffn_stats, block_inputs, check_width, layer_removal_error, run_block, stats_of
from ..scores.registry import Scores
from .step import PruneResult, copy_loaded

log = logging.getLogger(__name__)

METHOD = "calibrated"          # the recipe it follows (without Fisher)
PARAMS = ("ridge", "rebuilt", "floor", "multiple_of")
MODES = ("sequential", "dense")


def check_layerwise(method: str | None, params: dict | None, mode: str, inputs: str = "sequential") -> dict:
    """A layer-wise request's checks that need no model; returns the parameters with defaults."""
    if method not in (None, METHOD):
        raise UserError(f"--layerwise prunes with the {METHOD} recipe (its error term, without Fisher); "
                        f"give --method {METHOD}, not {method}")
    if mode != "physical":
        raise UserError("--layerwise removes neurons physically, block by block; give --mode physical")
    if inputs not in MODES:
        raise UserError(f"--layerwise takes {' or '.join(MODES)}, got {inputs!r}")
    params = dict(params or {})
    if params.get("allocation") not in (None, "local"):
        raise UserError("--layerwise allocates each block on its own (local); it cannot rank all layers at once")
    params.pop("allocation", None)
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise UserError(f"--layerwise takes the parameters {', '.join(PARAMS)}; not {', '.join(unknown)}")
    ridge, _ = check_recipe(params.get("ridge", DEFAULT_RIDGE), 0.0)
    alloc = check_allocation({"kind": "local", "floor": params.get("floor", 0.0),
                              "multiple_of": params.get("multiple_of", 1)})
    return {"ridge": ridge, "rebuilt": bool(params.get("rebuilt", True)), "floor": alloc["floor"],
            "multiple_of": alloc["multiple_of"]}


def _block_error(pruned: list[Tensor], dense: list[Tensor], inputs: list[Tensor], masks: list[Tensor]) -> float:
    """sum over real tokens of ||pruned - dense||^2 / sum of ||dense - input||^2 (what the block adds)."""
    num = den = 0.0
    for p, d, x, m in zip(pruned, dense, inputs, masks):
        m = m.to(d.device)
        num += float((p.float() - d.float())[m].pow(2).sum())
        den += float((d.float() - x.float().to(d.device))[m].pow(2).sum())
    return num / max(den, 1e-30)


def prune_layerwise(loaded: Loaded, calib: Calibration, sparsity: float, *, params: dict | None = None,
                    sequential: bool = True, inplace: bool = False, offload_folder: str | None = None,
                    progress: bool = True, keep_grams: bool = False,
                    on_block: Callable[[dict], None] | None = None) -> PruneResult:
    """Prune `loaded` block by block (see the module doc); returns the pruned model (a copy unless
    `inplace`; a model placed by a device map is always pruned in place), the plan, the per-block report
    (PruneResult.compensation["blocks"]) and the seconds it took.

    params: ridge, rebuilt (the error's leave-one-out share), floor (least fraction a block keeps),
    multiple_of. keep_grams: also return the per-block statistics (result.compensation["stats"], an FFNStats;
    tests compare them with the all-at-once path's). on_block(entry) is called after each block."""
    sparsity = check_sparsity(sparsity)
    p = check_layerwise(METHOD, params, "physical")
    if calib.loaded.model is not loaded.model:
        raise ValueError("the calibration sample belongs to another model")
    if loaded.kind == "classifier":
        raise UserError("--layerwise prunes causal LMs and backbones; a classifier's readout token needs the "
                        "all-at-once calibrated method")
    dispatched = is_dispatched(loaded.model)
    if dispatched and not inplace:
        raise UserError("a model placed by --device-map is pruned in place (a copy would not fit); pass inplace=True")
    work = loaded if inplace else copy_loaded(loaded)
    shadow = Calibration(work, calib.texts, calib.labels, calib.max_length, calib.batch_size, calib.seed)
    start = time.perf_counter()
    batches, hidden = block_inputs(work, shadow)
    masks = [b.mask for b in batches]
    n_tokens = int(sum(int(m.sum()) for m in masks))
    widths = ffn_widths(work.model)
    base = base_model(work.model)
    keep_all, errs, blocks, grams = [], [], [], []
    alloc = {"kind": "local", "multiple_of": p["multiple_of"]}
    for site in _progress(ffn_sites(work.model), progress):
        t0 = time.perf_counter()
        with onloaded(work.model, site.layer, offload_folder):
            t1 = time.perf_counter()
            gram, dense_out = block_ffn_stats(work, site.layer, batches, hidden)       # the dense block's pass
            down = get_module(base, site.down)
            check_width(down, gram, site.layer)
            gram = gram.cpu()
            t2 = time.perf_counter()
            err = layer_removal_error(down, gram, p["rebuilt"], p["ridge"])            # [d_ff]
            count = keep_counts([err], sparsity, alloc)[0]
            count = max(count, min(widths[site.layer], math.ceil(p["floor"] * widths[site.layer])))
            keep = select([err], [count])[0]
            kept = set(keep)
            removed = [j for j in range(widths[site.layer]) if j not in kept]
            t3 = time.perf_counter()
            entry, new_down, new_bias = compensate_layer(down, gram, keep, removed, ridge=p["ridge"],
                                                         layer=site.layer, inplace=False)
            if keep_grams:
                grams.append(gram)
            del gram
            t4 = time.perf_counter()
            dense_weights = [get_module(base, path).weight for path in (*site.up, site.down)]
            slice_block_ffn(work.model, site.layer, keep, new_down, new_bias)
            entry["released_bytes"] = release_mapped_pages(dense_weights)  # pages of a mapped checkpoint
            del dense_weights, down, new_down, new_bias
            pruned_out = run_block(work, get_module(base, site.block), batches, hidden)
            t5 = time.perf_counter()
        t6 = time.perf_counter()
        entry["block_rel_err"] = _block_error(pruned_out, dense_out, hidden, masks)
        entry["seconds"] = time.perf_counter() - t0
        entry["stage_s"] = {"onload": t1 - t0, "stats": t2 - t1, "score": t3 - t2, "compensate": t4 - t3,
                            "slice_and_run": t5 - t4, "offload": t6 - t5}
        hidden = pruned_out if sequential else dense_out
        del pruned_out, dense_out
        keep_all.append(keep)
        errs.append(err)
        blocks.append(entry)
        log.info("block %d: kept %d of %d; FFN error %.4f -> %.4f, block error %.4f (%.1f s)", site.layer, len(keep),
                 widths[site.layer], entry["rel_err_removed"], entry["rel_err_compensated"], entry["block_rel_err"],
                 entry["seconds"])
        if on_block is not None:
            on_block(dict(entry))
    set_config_widths(work.model, [len(k) for k in keep_all])
    seconds = time.perf_counter() - start
    mode = "sequential" if sequential else "dense"
    params_out = dict(score="removal_error", rebuilt=p["rebuilt"], layerwise=mode, calib_inputs=len(calib.texts),
                      calib_tokens=n_tokens, calib_max_length=calib.max_length, sparsity=sparsity,
                      allocation="local", floor=p["floor"], compensate=True, ridge=p["ridge"], readout_mix=0.0,
                      target_sparsity=sparsity)
    if p["multiple_of"] > 1:
        params_out["multiple_of"] = p["multiple_of"]
    plan = PruningPlan(keep=keep_all, widths=widths, base_model=loaded.base_spec, method=METHOD, params=params_out,
                       seed=calib.seed)
    mean = lambda k: sum(b[k] for b in blocks) / max(1, len(blocks))  # noqa: E731
    report = {"layerwise": mode, "blocks": blocks, "ridge": p["ridge"], "readout_mix": 0.0, "n_tokens": n_tokens,
              "mean_rel_err_removed": mean("rel_err_removed"), "mean_rel_err_compensated": mean("rel_err_compensated"),
              "mean_block_rel_err": mean("block_rel_err"),
              "ill_posed_layers": [b["layer"] for b in blocks if b.get("ill_posed")], "dispatched": dispatched}
    if keep_grams:
        report["stats"] = stats_of(grams, batches, calib, seconds)
    scores = Scores(errs, {"kind": "local", "multiple_of": p["multiple_of"]}, params_out,
                    compensation={"ridge": p["ridge"], "readout_mix": 0.0}, seed=calib.seed)
    log.info("layer-wise (%s): removed %d of %d FFN neurons (%.1f%%) in %.1f s", mode, plan.neurons_removed,
             sum(widths), 100 * plan.sparsity, seconds)
    return PruneResult(work, plan, report, seconds, scores)


def _progress(sites, progress: bool):
    return tqdm(sites, desc="layer-wise", disable=not progress, leave=False)
