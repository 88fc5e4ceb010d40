"""`anatomy-prune sweep`: every (method, sparsity), a grid's rows and targets on the same evaluation texts.

A SweepConfig becomes points; an executor runs `run_point` for each; rows are collected as they finish (each
written to the resume file at once), then results.json, aggregate.json, predictions.json, sweep.json, plans/
and figures/. A failing point is reported and the others go on; a stopped sweep resumes.
"""
from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.reviews import TextSet
from ..errors import UserError
from ..evaluate.counts import count_params, ffn_flops_per_token, flops_per_token
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.stats import mcnemar, seed_summary
from ..evaluate.timing import peak_mem_mb
from ..models.families import ffn_sites
from ..models.loading import ALIASES, Loaded, load_model
from ..plan.plan import PruningPlan
from ..progress import tqdm
from ..runfolder import RunFolder, now_iso
from ..scores.calibration import Calibration, make_calibration
from ..scores.registry import get_scorer
from .allocation import Allocation
from .executors import ContextCache, make_executor
from .requests import SweepConfig
from .step import prune_step
from .sweep_resume import resumable
from .sweep_schema import grid_points

log = logging.getLogger(__name__)

# The first paper's numbers: BERT-base fine-tuned on IMDB, 1,000 test reviews, no retraining (section 5.3).
PAPER_BERT_IMDB = {"label": "paper, BERT-base", "dense": 0.852,
                   "points": [{"method": "strategy", "sparsity": 0.3, "accuracy": 0.851},
                              {"method": "strategy", "sparsity": 0.7, "accuracy": 0.780},
                              {"method": "random", "sparsity": 0.5, "accuracy": 0.582}]}
QUALITY = ("accuracy_interval", "interval_level", "f1", "roc_auc", "confusion_matrix", "standard_error", "correct")


# --- rows -----------------------------------------------------------------------------------------

def _brief(params: dict) -> dict:
    """Plan parameters worth a results row (long per-layer lists stay in the plan files)."""
    return {k: v for k, v in params.items() if k not in ("thresholds", "layer_sim", "rule_removed_per_layer")}


def _row(loaded: Loaded, result: dict, metric: str, **fields) -> dict:
    return {**fields, metric: result[metric], "latency_s": result["latency_s"], "n_eval": result["n_eval"],
            **{k: result[k] for k in QUALITY if k in result},
            "params": count_params(loaded.model), "flops_per_token": flops_per_token(loaded.model),
            "ffn_flops_per_token": ffn_flops_per_token(loaded.model),
            **{k: result[k] for k in ("device", "device_name", "threads", "dtype") if k in result}}


def aggregate(rows: list[dict], metric: str) -> list[dict]:
    """Per (method, target sparsity, label): the metric's mean, standard deviation and every seed's value."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("target_sparsity"), r.get("label")), []).append(r)
    out = []
    for (method, target, label), rs in groups.items():
        s = seed_summary([r[metric] for r in rs])
        out.append({"method": method, "target_sparsity": target, "label": label,
                    "sparsity": sum(r["sparsity"] for r in rs) / len(rs), "seeds": [r.get("seed") for r in rs],
                    metric: s["mean"], f"{metric}_std": s["std"], f"{metric}_values": s["values"],
                    "n_seeds": s["n_seeds"], "vs_dense_p_values": [r.get("vs_dense", {}).get("p_value") for r in rs]})
    return out


# --- one point (in this process or a Ray worker) ------------------------------------------------------

@dataclass
class SweepContext:
    """What every point of a sweep shares: the dense model, the evaluation texts, the calibration sample
    (its statistics cached on it) and the metric."""

    loaded: Loaded
    eval_data: TextSet
    calib: Calibration
    metric: str


def context_spec(cfg: SweepConfig) -> dict:
    """Plain data that rebuilds a sweep's context anywhere: the config with paths made absolute (a Ray worker
    may start elsewhere) and `stamps` (size and modification time of the files named), so no process
    reuses a model whose files changed."""
    stamps: dict = {}

    def where(text, keywords=()):
        path = Path(str(text)).expanduser()
        if text is None or text in keywords or not path.exists():
            return text
        files = sorted(p for p in path.rglob("*") if p.is_file())[:1000] if path.is_dir() else [path]
        stamps[str(path.resolve())] = [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in files]
        return str(path.resolve())
    cfg = replace(cfg, model=where(cfg.model, ALIASES), eval=replace(cfg.eval, data=where(cfg.eval.data, ("imdb", "hf"))),
                  calib=replace(cfg.calib, data=where(cfg.calib.source(cfg.eval.data), ("imdb", "hf"))))
    return {"sweep": cfg, "context": {"model": cfg.model, "device": cfg.device, "dtype": cfg.dtype,
                                      "eval": cfg.eval.__dict__, "calib": cfg.calib.__dict__, "stamps": stamps}}


def build_context(spec: dict) -> SweepContext:
    """Load the model, read the evaluation texts and draw the calibration sample of a context spec."""
    cfg: SweepConfig = spec["sweep"]
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    eval_data = evaluation_set(loaded, cfg.eval.data, cfg.eval.size, cfg.eval.split)
    calib = make_calibration(loaded, cfg.calib.size, cfg.calib.max_length, cfg.calib.seed, cfg.calib.data,
                             exclude=eval_data.texts)
    return SweepContext(loaded, eval_data, calib, metric_name(loaded.kind))


def _context(spec: dict, cache: ContextCache) -> SweepContext:
    return cache.get({"context": spec["context"]}, lambda _: build_context(spec))


def run_point(spec: dict, point: dict, cache: ContextCache) -> dict:
    """One point: prune_step on a copy of the dense model, then evaluate. Returns {row, plan, calib_stats_s}.
    prune_s follows calib.charged(): what a standalone `prune` would pay, statistics computed by an earlier
    point of this process charged at their own cost, so local and Ray rows are comparable."""
    ctx = _context(spec, cache)
    req = spec["sweep"].point_request(point)
    res = prune_step(ctx.calib, req)
    plan = res.plan
    result = evaluate(res.loaded, ctx.eval_data, req.eval.batch_size, req.eval.max_length, progress=False)
    row = _row(res.loaded, result, ctx.metric, method=point["method"],
               sparsity=plan.sparsity if point["sparsity"] is None else point["sparsity"],
               target_sparsity=point["sparsity"], achieved_sparsity=plan.sparsity, mode=req.mode,
               neurons_removed=plan.neurons_removed, neurons_removed_per_layer=plan.removed_per_layer,
               prune_s=res.prune_s, plan_params=_brief(plan.params), label=point["label"], seed=point.get("seed"),
               plan=f"plans/{point['index']:02d}-{point['method']}.json", compensated=res.compensation is not None,
               heads_removed=res.plan.heads_removed if res.plan.heads is not None else 0, quantize=res.quantize)
    if res.cost_model:
        row.update(target=req.target, predicted_cost_ratio=res.cost_model["predicted"] / res.cost_model["dense"])
    if res.compensation:
        row["compensation"] = res.compensation
    return {"row": row, "plan": plan.to_dict(), "calib_stats_s": dict(ctx.calib.timings)}


def _failed(pt: dict, error: str) -> dict:
    return {"point": pt["index"], "method": pt["method"], "sparsity": pt["sparsity"], "target_sparsity": pt["sparsity"],
            "seed": pt.get("seed"), "label": pt["label"], "params": pt["params"], "error": error}


# --- the sweep --------------------------------------------------------------------------------------

def settings_of(cfg: SweepConfig) -> dict:
    """What the run folder records (and digests): the settings that change results, not where they run."""
    c = cfg
    return {"model": c.model, "methods": list(c.methods), "sparsities": list(c.sparsities), "mode": c.mode,
            "config": c.grid, "params": c.params, "compensate": c.compensate, "eval_size": c.eval.size,
            "data": c.eval.data, "split": c.eval.split, "calib_size": c.calib.size,
            "calib_max_length": c.calib.max_length, "calib_data": c.calib.source(c.eval.data),
            "batch_size": c.eval.batch_size, "max_length": c.eval.max_length, "seed": c.calib.seed, "seeds": c.seeds,
            **({"allocation": c.allocation.record()} if c.allocation != Allocation() else {}),
            **({"compensation": c.compensation.__dict__} if c.compensation is not None else {}),
            **({"targets": list(c.targets)} if c.targets else {}), **({"quantize": c.quantize} if c.quantize else {})}


def run_sweep(cfg: SweepConfig, out: str | Path, *, progress: bool = True, force: bool = False,
              resume: bool = True) -> list[dict]:
    """Run every point of `cfg` and write the run folder `out`; returns the rows written to results.json,
    with an error entry ({point, method, sparsity, seed, label, params, error}) for each point that failed.
    resume=False computes every point again (--restart)."""
    runner = make_executor(cfg)  # probes --address
    spec = context_spec(cfg)
    with RunFolder(out, "sweep", settings_of(cfg), force=force) as rf, runner:
        return _sweep(rf, runner, spec, resume, progress)


def points_of(cfg: SweepConfig, loaded: Loaded) -> list[dict]:
    """Methods x sparsities (x seeds of stochastic methods), the grid's rows, the targets; each indexed."""
    points = [{"method": m, "sparsity": s, "params": {**cfg.params.get(m, {}), **({"seed": k} if k is not None else {})},
               "label": None, "seed": k}
              for m in cfg.methods for s in cfg.sparsities if s > 0
              for k in (range(cfg.seeds) if get_scorer(m).stochastic and "seed" not in cfg.params.get(m, {}) else [None])]
    if cfg.grid:
        points += grid_points(cfg.grid, loaded)
    points += [{"method": "calibrated", "sparsity": None, "params": {}, "target": t, "seed": None,
                "label": f"target {'flops' if 'flops' in t else 'speedup'} {t.get('flops', t.get('speedup'))}"}
               for t in cfg.targets]
    return [{**pt, "index": i} for i, pt in enumerate(points)]


def _dense_row(ctx: SweepContext, cfg: SweepConfig) -> dict:
    result = evaluate(ctx.loaded, ctx.eval_data, cfg.eval.batch_size, cfg.eval.max_length, progress=False)
    dense = _row(ctx.loaded, result, ctx.metric, method="dense", sparsity=0.0, target_sparsity=0.0,
                 achieved_sparsity=0.0, mode=cfg.mode, neurons_removed=0,
                 neurons_removed_per_layer=[0] * len(ffn_sites(ctx.loaded.model)), prune_s=0.0,
                 plan_params={}, label=None, compensated=False, seed=None)
    log.info("dense: %s %.4f, %.1f s", ctx.metric, dense[ctx.metric], dense["latency_s"])
    return dense


def _sweep(rf: RunFolder, runner, spec: dict, resume: bool, progress: bool) -> list[dict]:
    cfg: SweepConfig = spec["sweep"]
    ctx = _context(spec, runner.cache)
    points = points_of(cfg, ctx.loaded)
    dense, done = resumable(rf.read_resume() if resume else None, points)
    resumed = len(done)
    if dense is not None:
        log.info("resuming the stopped sweep in %s: %d of %d points done", rf.path, resumed, len(points))
    else:
        dense, done = _dense_row(ctx, cfg), {}
    todo = [(i, pt) for i, pt in enumerate(points) if i not in done]
    failed, stats_s = _collect(rf, runner, spec, points, todo, dense, done, progress)
    if not done:
        first = failed[min(failed)]
        raise UserError(f"every point of the sweep failed, nothing written (point {first['point']}, "
                        f"{first['method']}: {first['error']})")
    if failed:
        log.warning("%d of %d points failed; the others are in results.json, the failed ones under 'failed' in "
                    "sweep.json", len(failed), len(points))
    rows = [dense] + [done[i][0] for i in sorted(done)]
    reference = cfg.reference if cfg.reference is not None or ctx.loaded.kind != "classifier" else PAPER_BERT_IMDB
    summary = {**settings_of(cfg), "base_model": ctx.loaded.base_spec, "kind": ctx.loaded.kind, "metric": ctx.metric,
               "eval_size": len(ctx.eval_data), "calib_size": len(ctx.calib.texts),
               "calib_max_length": ctx.calib.max_length, "calib_stats_s": {**stats_s, **ctx.calib.timings},
               "peak_mem_mb": peak_mem_mb(), "runtime": {k: dense.get(k) for k in ("device", "device_name", "threads", "torch")},
               "reference": reference, "resumed_after": resumed, "computed": len(todo) - len(failed),
               "executor": runner.info(), "failed": [failed[i] for i in sorted(failed)], "created": now_iso()}
    _write(rf, rows, done, points, summary, ctx.metric)
    if cfg.figures:
        draw_sweep_figures([{k: v for k, v in r.items() if k != "correct"} for r in rows], rf.stage_dir("figures"),
                           reference=reference)
    return [dense] + [done[i][0] if i in done else failed[i] for i in range(len(points)) if i in done or i in failed]


def _collect(rf: RunFolder, runner, spec: dict, points: list[dict], todo: list, dense: dict, done: dict,
             progress: bool) -> tuple[dict, dict]:
    """Run the points still to do; each finished row goes to `done` and the resume file at once."""
    failed: dict[int, dict] = {}
    stats_s: dict = {}
    bar = tqdm(total=len(todo), desc="sweep", disable=not progress)
    with bar, closing(runner.run(run_point, spec, todo)) as outcomes:
        for out in outcomes:
            bar.update(1)
            pt = points[out.index]
            if out.error is not None:
                failed[out.index] = _failed(pt, out.error)
                log.warning("sweep point %d failed (method %s, sparsity %s, params %s%s): %s", out.index,
                            pt["method"], pt["sparsity"], json.dumps(pt["params"]),
                            f", label {pt['label']}" if pt["label"] else "", out.error)
                log.debug("%s", out.detail)
                continue
            row, plan = out.value["row"], out.value["plan"]
            stats_s.update({k: v for k, v in out.value["calib_stats_s"].items() if k not in stats_s})
            if "correct" in row and "correct" in dense:
                row["vs_dense"] = mcnemar(row["correct"], dense["correct"])
            done[out.index] = (row, plan)
            order = sorted(done)
            rf.write_resume({"rows": [dense] + [done[i][0] for i in order], "plans": [done[i][1] for i in order],
                             "points": order})
            metric = "accuracy" if "accuracy" in row else "perplexity"
            log.info("%s at %.2f: %s %.4f, %.1f s (prune %.2f s)", pt["method"], row["sparsity"], metric,
                     row[metric], row["latency_s"], row["prune_s"])
    return failed, stats_s


def _write(rf: RunFolder, rows: list[dict], done: dict, points: list[dict], summary: dict, metric: str) -> None:
    rf.write_json("results.json", [{k: v for k, v in r.items() if k != "correct"} for r in rows])
    rf.write_json("predictions.json", {"note": "per row of results.json (same order): 1 where the review was "
                                       "classified correctly", "rows": [r.get("correct") for r in rows]})
    rf.write_json("aggregate.json", aggregate(rows, metric))
    rf.write_json("sweep.json", summary)
    plan_dir = rf.stage_dir("plans")
    for i in sorted(done):
        PruningPlan.from_dict(done[i][1]).save(plan_dir / f"{i:02d}-{points[i]['method']}.json")


def draw_sweep_figures(rows: list[dict], folder: str | Path, reference: dict | None = None) -> list[Path]:
    """Figures 4 / 5 (metric vs sparsity), 4-1 / 5-1 (time vs sparsity) and 4a (neurons pruned per layer)."""
    from ..plotting import pruning

    return [pruning.metric_vs_sparsity(rows, folder, reference=reference),
            pruning.latency_vs_sparsity(rows, folder),
            pruning.neurons_per_layer(rows, folder)]
