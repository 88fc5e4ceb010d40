"""Layer-wise pruning (`prune --layerwise`): score, compensate and slice one block at a time, so that only one
block's activations and one FFN's Gram matrix are held at once and a model placed on several devices or on
disk is pruned on each block's execution device. Returns the PruneResult `prune_step` returns. The method
and its memory bounds: docs/layerwise.md.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

from torch import Tensor
from tqdm.auto import tqdm

from ..apply.layerwise import compensate_layer, slice_block_ffn
from ..errors import UserError
from ..models.families import base_model, ffn_sites, ffn_widths, get_module
from ..models.offload import is_dispatched, onloaded, release_mapped_pages
from ..models.surgery import set_config_widths
from ..plan.allocate import keep_counts, select
from ..plan.plan import PruningPlan
from ..scores.calibration import Calibration
from ..scores.layerwise import block_ffn_stats, block_inputs, check_width, layer_removal_error, run_block, stats_of
from ..scores.registry import Scores
from .requests import LAYERWISE_METHOD as METHOD, PruneRequest
from .step import PruneResult, copy_loaded

log = logging.getLogger(__name__)


def _block_error(pruned: list[Tensor], dense: list[Tensor], inputs: list[Tensor], masks: list[Tensor]) -> float:
    """sum over real tokens of ||pruned - dense||^2 / sum of ||dense - input||^2 (what the block adds)."""
    num = den = 0.0
    for p, d, x, m in zip(pruned, dense, inputs, masks):
        m = m.to(d.device)
        num += float((p.float() - d.float())[m].pow(2).sum())
        den += float((d.float() - x.float().to(d.device))[m].pow(2).sum())
    return num / max(den, 1e-30)


def prune_layerwise(calib: Calibration, req: PruneRequest, *, inplace: bool = False, progress: bool = True,
                    keep_grams: bool = False, on_block: Callable[[dict], None] | None = None) -> PruneResult:
    """Prune the calibration sample's model block by block as `req` asks (req.layerwise: sequential or dense
    inputs); a copy unless `inplace` (a model placed by a device map is always pruned in place). The report
    (PruneResult.compensation) has one entry per block; keep_grams adds the per-block statistics (for tests),
    and on_block(entry) is called after each block."""
    loaded, sparsity, sequential = calib.loaded, req.sparsity, req.layerwise != "dense"
    offload_folder = req.offload_folder
    p = req.layerwise_settings()
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
                      calib_tokens=n_tokens, calib_max_length=calib.max_length, allocation="local",
                      floor=p["floor"], compensate=True, ridge=p["ridge"], readout_mix=0.0)
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
