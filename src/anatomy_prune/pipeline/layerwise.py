"""Layer-wise pruning (`prune --layerwise`): score, compensate and slice one block at a time, so that only one
block's activations and one FFN's Gram matrix are held at once and a model placed on several devices or on
disk is pruned on each block's execution device. Returns the PruneResult `prune_step` returns. The method
and its memory bounds: docs/layerwise.md.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from ..apply.compensate import compensate_layer
from ..apply.layerwise import slice_block_ffn
from ..errors import UserError
from ..linalg import FitSpec
from ..models.families import base_model, ffn_sites, ffn_widths, get_module
from ..models.loaded import Loaded
from ..models.offload import is_dispatched, onloaded, release_mapped_pages
from ..models.surgery import set_config_widths
from ..plan.allocate import keep_counts, select
from ..plan.plan import PruningPlan
from ..progress import tqdm
from ..scores.calibration import Calibration
from ..scores.calibrated import layer_removal_error, neuron_path_default
from ..scores.layerwise import block_ffn_stats, block_inputs, check_width, run_block, stats_of
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
    loaded, p = calib.loaded, {**req.layerwise_settings(), "keep_grams": keep_grams}
    if p["neuron_path"] is None:
        p["neuron_path"] = neuron_path_default(loaded.kind, heads=False)
    if loaded.kind == "classifier":
        raise UserError("--layerwise prunes causal LMs and backbones; a classifier's readout token needs the "
                        "all-at-once calibrated method")
    dispatched = is_dispatched(loaded.model)
    if dispatched and not inplace:
        raise UserError("a model placed by --device-map is pruned in place (a copy would not fit); pass inplace=True")
    work = loaded if inplace else copy_loaded(loaded)
    shadow = calib.for_model(work)
    start = time.perf_counter()
    batches, hidden = block_inputs(work, shadow)
    done = _Done()
    for site in _progress(ffn_sites(work.model), progress):
        keep, err, entry, gram, dense_out, pruned_out = _prune_block(work, site, batches, hidden, p, req)
        entry["block_rel_err"] = _block_error(pruned_out, dense_out, hidden, [b.mask for b in batches])
        hidden = pruned_out if req.layerwise != "dense" else dense_out
        del pruned_out, dense_out
        done.add(keep, err, entry, gram)
        log.info("block %d: kept %d of %d; FFN error %.4f -> %.4f, block error %.4f (%.1f s)", site.layer, len(keep),
                 entry["width"], entry["rel_err_removed"], entry["rel_err_compensated"], entry["block_rel_err"],
                 entry["seconds"])
        if on_block is not None:
            on_block(dict(entry))
    set_config_widths(work.model, [len(k) for k in done.keep])
    seconds = time.perf_counter() - start
    plan, report, scores = _outcome(calib, req, p, done, batches, dispatched)
    if keep_grams:
        report["stats"] = stats_of(done.grams, batches, calib, seconds)
    log.info("layer-wise (%s): removed %d of %d FFN neurons (%.1f%%) in %.1f s", req.layerwise, plan.neurons_removed,
             sum(plan.widths), 100 * plan.sparsity, seconds)
    return PruneResult(work, plan, report, seconds, scores)


@dataclass
class _Done:
    """What the blocks pruned so far gave: kept ids, error scores, report entries, Gram matrices (keep_grams)."""

    keep: list = field(default_factory=list)
    errs: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    grams: list = field(default_factory=list)

    def add(self, keep: list[int], err: Tensor, entry: dict, gram: Tensor | None) -> None:
        self.keep.append(keep)
        self.errs.append(err)
        self.entries.append(entry)
        if gram is not None:
            self.grams.append(gram)


def _prune_block(work: Loaded, site, batches: list, hidden: list[Tensor], p: dict, req: PruneRequest) -> tuple:
    """One block on its execution device: statistics, scores, keep, compensation, slicing, its pruned outputs.
    Returns (keep, err [d_ff], entry, gram (None unless p["keep_grams"]), dense outputs, pruned outputs)."""
    base, width = base_model(work.model), ffn_widths(work.model)[site.layer]
    t0 = time.perf_counter()
    with onloaded(work.model, site.layer, req.offload_folder):
        t1 = time.perf_counter()
        gram, dense_out = block_ffn_stats(work, site.layer, batches, hidden)       # the dense block's pass
        down = get_module(base, site.down)
        check_width(down, gram, site.layer)
        gram = gram.cpu()
        t2 = time.perf_counter()
        err = layer_removal_error(down, gram, p["rebuilt"], p["ridge"], p["neuron_path"])   # [d_ff]
        count = keep_counts([err], req.sparsity, {"kind": "local", "multiple_of": p["multiple_of"]})[0]
        count = max(count, min(width, math.ceil(p["floor"] * width)))
        keep = select([err], [count])[0]
        kept = set(keep)
        removed = [j for j in range(width) if j not in kept]
        t3 = time.perf_counter()
        entry, new_down, new_bias = compensate_layer(down, gram, keep, removed, FitSpec(ridge=p["ridge"]),
                                                     layer=site.layer, inplace=False)
        gram = gram if p["keep_grams"] else None   # one FFN's Gram matrix at a time
        t4 = time.perf_counter()
        dense_weights = [get_module(base, path).weight for path in (*site.up, site.down)]
        slice_block_ffn(work.model, site.layer, keep, new_down, new_bias)
        entry["released_bytes"] = release_mapped_pages(dense_weights)  # pages of a mapped checkpoint
        del dense_weights, down, new_down, new_bias
        pruned_out = run_block(work, get_module(base, site.block), batches, hidden)
        t5 = time.perf_counter()
    t6 = time.perf_counter()
    entry["width"] = width
    entry["seconds"] = t6 - t0
    entry["stage_s"] = {"onload": t1 - t0, "stats": t2 - t1, "score": t3 - t2, "compensate": t4 - t3,
                        "slice_and_run": t5 - t4, "offload": t6 - t5}
    return keep, err, entry, gram, dense_out, pruned_out


def _outcome(calib: Calibration, req: PruneRequest, p: dict, done: _Done, batches: list, dispatched: bool) -> tuple:
    """The plan, the report and the scores of a finished layer-wise run (p: its settings, defaults resolved)."""
    blocks = done.entries
    n_tokens = int(sum(int(b.mask.sum()) for b in batches))
    params = dict(score="removal_error", rebuilt=p["rebuilt"], layerwise=req.layerwise, calib_inputs=len(calib.texts),
                  calib_tokens=n_tokens, calib_max_length=calib.max_length, allocation="local",
                  floor=p["floor"], compensate=True, ridge=p["ridge"], readout_mix=0.0)
    if p["neuron_path"]:
        params["neuron_path"] = True
    if p["multiple_of"] > 1:
        params["multiple_of"] = p["multiple_of"]
    plan = PruningPlan(keep=done.keep, widths=[b["width"] for b in blocks], base_model=calib.loaded.base_spec,
                       method=METHOD, params=params, seed=calib.seed)
    mean = lambda k: sum(b[k] for b in blocks) / max(1, len(blocks))  # noqa: E731
    report = {"layerwise": req.layerwise, "blocks": blocks, "ridge": p["ridge"], "readout_mix": 0.0,
              "n_tokens": n_tokens, "mean_rel_err_removed": mean("rel_err_removed"),
              "mean_rel_err_compensated": mean("rel_err_compensated"), "mean_block_rel_err": mean("block_rel_err"),
              "ill_posed_layers": [b["layer"] for b in blocks if b.get("ill_posed")], "dispatched": dispatched}
    scores = Scores(done.errs, params, seed=calib.seed)
    return plan, report, scores


def _progress(sites, progress: bool):
    return tqdm(sites, desc="layer-wise", disable=not progress, leave=False)
