"""`anatomy-prune sweep`: every (method, sparsity) on the same evaluation texts, and the report.

The model is loaded once; calibration statistics (similarities, activations, weight norms, Gram matrices)
are computed once on the unpruned model and shared by all methods and sparsities. Each point is one
`prune_step` on a fresh copy of the dense model, then an evaluation.

DIR/results.json is a list of rows, the dense baseline first (method "dense", sparsity 0):
  {method, sparsity, target_sparsity, achieved_sparsity, mode, accuracy | perplexity, latency_s, n_eval,
   neurons_removed, neurons_removed_per_layer, params, flops_per_token, prune_s, plan_params, label, plan}
Every accuracy carries its 95% Wilson interval, and every point is compared with the dense model on the same
reviews by McNemar's exact test (`vs_dense`: the difference, the discordant counts, the p-value). Methods
whose scores are random draws (random) run over `seeds` seeds (default 5); DIR/aggregate.json gives each
(method, sparsity) its mean, standard deviation and every seed. DIR/predictions.json keeps every row's
per-review correctness, for paired comparisons between methods (pipeline.report.compare_methods).
DIR/sweep.json records the settings, DIR/plans/ every plan, DIR/figures/ the figures (PNG + PDF).
A config file (TOML, e.g. the packaged paper_figure5a.toml) adds rows with explicit method parameters.
Finished points are kept in the run folder's resume file, so a stopped sweep with the same settings
(under either executor) computes only the points that are missing.

Design: settings -> a list of points (method, sparsity, seed or a config row) -> an executor
(pipeline.executors) runs `run_point(context_spec, point) -> row` for each -> the driver collects the rows as
they finish, writes each to the resume file at once (atomically, from the driver only), and writes the
outputs at the end. `context_spec` is plain data (model, data, calibration and evaluation settings);
`context_for(spec)` builds the context (model, evaluation texts, calibration sample) once per process and
keeps it, so a process that runs several points loads the model and computes each calibration statistic once.

Executors (`--executor`, default local):
- local: the points in order in this process, with the driver's model and statistics (as before).
- ray: one Ray task per point with its own request (`--num-cpus-per-task`, default 1, which also sets the
  task's torch threads; `--num-gpus-per-task`, default 0). Each Ray worker loads the model and computes the
  statistics it needs once, for all the points it runs. prune_s keeps the standalone rule of
  `Calibration.charged()` (a statistic computed by an earlier point is charged at its own cost), so rows are
  comparable across executors; its seconds are the worker's (its threads, its device). The dense baseline is
  evaluated by the driver. Results (metrics, plans) are the same as local.
A point that raises is reported (a one-line warning naming its parameters; an error entry in run_sweep's
returned rows; sweep.json "failed") and the other points go on. The sweep succeeds (exit 0) when at least
one point succeeded; results.json then holds the points that succeeded. When every point fails it is a
one-line error (exit 2) and nothing is written. Points that failed are computed again by a rerun.

Running on a Ray cluster (`pip install "anatomy-prune[cluster]"` on every machine, the same Python and
package versions everywhere):

    # on the head machine
    ray start --head --port 6379
    # on every other machine
    ray start --address HEAD:6379
    # then, on the head (or any machine that reaches HEAD:6379), the sweep as usual
    anatomy-prune sweep --executor ray --address HEAD:6379 --model runs/demo/finetune/model \
        --methods random,magnitude,strategy --sparsities 0.1,0.3,0.5,0.7,0.9 --num-cpus-per-task 4 --out runs/sweep
    # one GPU per point on GPU machines: --num-gpus-per-task 1 (or 0.5 for two points per GPU)

Without --address the sweep starts a local Ray instance (all CPUs and GPUs of this machine) and stops it at
the end; --executor ray --num-cpus-per-task 1 on a 16-core machine runs 16 points at a time. Every machine
must see the model folder and data files at the same absolute path (a shared filesystem) or use an alias /
hub id; relative paths are made absolute on the driver. The driver loads the model too (the dense baseline,
config rows). An unreachable --address is a one-line error within seconds, before anything is written.
Token authentication: recent Ray turns it on by default (Ray 2.60's `ray start --head` did); then every
machine and the driver need RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file that
`ray get-auth-token` reads), e.g. `RAY_AUTH_MODE=token anatomy-prune sweep --executor ray --address ...`;
without it joining fails after Ray's retries (about 20 s) with a one-line error. See Ray's "token
authentication" guide. Stop the cluster with `ray stop` on each machine.
"""
from __future__ import annotations

import json
import logging
import tomllib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..apply.modes import check_mode
from ..data.reviews import TextSet
from ..data.splits import CALIB_SIZE
from ..errors import UserError
from ..evaluate.counts import count_params, ffn_flops_per_token, flops_per_token
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.stats import mcnemar, seed_summary
from ..evaluate.timing import peak_mem_mb
from ..models.families import ffn_sites
from ..models.loading import ALIASES, Loaded, load_model
from ..plan.plan import PruningPlan, check_sparsity
from ..resources import config_path
from ..runfolder import RunFolder, now_iso, settings_digest
from ..scores.calibration import CALIB_MAX_LENGTH, Calibration, make_calibration
from ..scores.registry import check_params, get_scorer
from ..scores.strategy import map_focus
from .executors import make_executor
from .step import check_sizes, check_target, prune_step

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("random", "magnitude", "strategy", "activation")
DEFAULT_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)

# The first paper's numbers: BERT-base fine-tuned on IMDB, 1,000 test reviews, no retraining (section 5.3).
PAPER_BERT_IMDB = {"label": "paper, BERT-base", "dense": 0.852,
                   "points": [{"method": "strategy", "sparsity": 0.3, "accuracy": 0.851},
                              {"method": "strategy", "sparsity": 0.7, "accuracy": 0.780},
                              {"method": "random", "sparsity": 0.5, "accuracy": 0.582}]}
ROW_KEYS = ("method", "sparsity")


# --- inputs ---------------------------------------------------------------------------------------

def parse_list(text: str | Sequence, what: str, cast=str) -> list:
    """'a,b,c' (or a list) -> [cast(a), ...]; a one-line UserError for an item that is not a `what`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s != ""]
    try:
        return [cast(s) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"--{what}: expected a comma-separated list, got '{text}'") from None


def load_config(path: str | Path) -> dict:
    """A sweep config (TOML): `focus_depth` and a list of `[[row]]` tables, each with `method`, optional
    `family` (encoder / decoder: rows for the other family are skipped), `sparsity` or method parameters
    (`alpha`, `beta`, `focus` given for a `focus_depth`-block model), and an optional `label`.
    A bare file name that is not a file finds a config shipped with the package."""
    p = Path(path)
    if not p.is_file():
        p = config_path(p.name)
    try:
        cfg = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file '{path}' is not valid TOML ({exc})") from None
    rows = cfg.get("row")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"config file '{path}' has no [[row]] tables")
    depth = cfg.get("focus_depth", 12)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 1000:
        raise UserError(f"config '{path}': focus_depth must be a whole number in [1, 1000], got {depth!r}")
    for i, row in enumerate(rows, 1):
        if "method" not in row or not isinstance(row["method"], str):
            raise UserError(f"config '{path}' row {i} has no method")
        get_scorer(row["method"])
        if row.get("family", "encoder") not in ("encoder", "decoder", "any"):
            raise UserError(f"config '{path}' row {i}: family must be encoder, decoder or any")
        if "sparsity" in row:
            check_sparsity(row["sparsity"], f"config '{path}' row {i}: sparsity")
        params = {k: v for k, v in row.items() if k not in ("method", "family", "sparsity", "label")}
        try:
            check_params(row["method"], params)
        except UserError as exc:
            raise UserError(f"config '{path}' row {i}: {exc}") from None
        defaults = get_scorer(row["method"]).params
        for k, v in params.items():
            want = defaults.get(k)
            if k == "focus":
                if not isinstance(v, list) or not all(isinstance(f, int) and not isinstance(f, bool) for f in v):
                    raise UserError(f"config '{path}' row {i}: focus must be a list of block numbers")
            elif isinstance(want, bool):
                if not isinstance(v, bool):
                    raise UserError(f"config '{path}' row {i}: {k} must be true or false, got {v!r}")
            elif isinstance(want, str):
                if not isinstance(v, str):
                    raise UserError(f"config '{path}' row {i}: {k} must be text, got {v!r}")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"config '{path}' row {i}: {k} must be a number, got {v!r}")
    return cfg


def config_points(cfg: dict, loaded: Loaded) -> list[dict]:
    """The config's rows that apply to this model: {method, sparsity, params, label}; focus layers mapped."""
    family = "decoder" if loaded.family.decoder else "encoder"
    depth = int(cfg.get("focus_depth", 12))
    n_layers = len(ffn_sites(loaded.model))
    points = []
    for row in cfg["row"]:
        if row.get("family", "any") not in (family, "any"):
            continue
        params = {k: v for k, v in row.items() if k not in ("method", "family", "sparsity", "label")}
        if "focus" in params:
            params["focus"] = map_focus(params["focus"], n_layers, depth, mapping=params.get("focus_mapping", "depth"))
        label = row.get("label") or ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("method", "family"))
        points.append({"method": row["method"], "sparsity": row.get("sparsity"), "params": params, "label": str(label)})
    if not points:
        raise UserError(f"the config has no rows for a {family}; add rows with family = \"{family}\"")
    return points


# --- rows -----------------------------------------------------------------------------------------

def _brief(params: dict) -> dict:
    """Plan parameters worth a results row (long per-layer lists stay in the plan files)."""
    return {k: v for k, v in params.items() if k not in ("thresholds", "layer_sim", "rule_removed_per_layer")}


QUALITY = ("accuracy_interval", "interval_level", "f1", "roc_auc", "confusion_matrix", "standard_error", "correct")


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


def _resumable(done: dict | None, points: list[dict]) -> tuple[dict | None, dict[int, tuple[dict, dict]]]:
    """The dense row and the finished points {index: (row, plan)} of a stopped sweep that match the points
    about to run (checked, never trusted). `points` lists each row's point index (a Ray sweep finishes
    points out of order); without it (older files) the rows are the first points in order."""
    if not done or not isinstance(done.get("rows"), list) or not isinstance(done.get("plans"), list):
        return None, {}
    rows, plans = done["rows"], done["plans"]
    index = done.get("points", list(range(len(plans))))
    if not rows or not isinstance(index, list) or not len(rows) - 1 == len(plans) == len(index):
        return None, {}
    if not all(isinstance(r, dict) for r in rows) or rows[0].get("method") != "dense":
        return None, {}
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(points) for i in index) \
            or len(set(index)) != len(index):
        return None, {}
    try:
        checked = [PruningPlan.from_dict(p).to_dict() for p in plans]
    except UserError:
        return None, {}
    if any((r.get("method"), r.get("target_sparsity"), r.get("seed"), r.get("label"))
           != (points[i]["method"], points[i]["sparsity"], points[i].get("seed"), points[i]["label"])
           for r, i in zip(rows[1:], index)):
        return None, {}
    if not all(_row_is_sound(r) for r in rows):
        return None, {}
    return rows[0], {i: (r, p) for i, r, p in zip(index, rows[1:], checked)}


def _row_is_sound(row: dict) -> bool:
    """A resumed row's numbers are numbers (a resume file is data, never trusted): the metric, the latency,
    the counts, and per-review correctness as 0/1 when present."""
    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    metric = "accuracy" if "accuracy" in row else "perplexity"
    if not num(row.get(metric)) or not num(row.get("latency_s")) or not num(row.get("sparsity", 0.0)):
        return False
    for k in ("params", "flops_per_token", "neurons_removed", "n_eval"):
        if k in row and not num(row[k]):
            return False
    correct = row.get("correct")
    return correct is None or (isinstance(correct, list) and all(c in (0, 1) for c in correct))


# --- one point (in this process or a Ray worker) ------------------------------------------------------

@dataclass
class SweepContext:
    """What every point of a sweep shares: the dense model, the evaluation texts, the calibration sample
    (its statistics cached on it) and the metric."""

    loaded: Loaded
    eval_data: TextSet
    calib: Calibration
    metric: str


_CONTEXTS: dict[str, SweepContext] = {}  # this process's context, by the digest of its spec (one at a time)


def context_spec(model_spec: str, *, device, dtype, data, eval_size, split, calib_size, calib_max_length,
                 calib_data, seed, batch_size, max_length, mode, compensate) -> dict:
    """Plain data that rebuilds a sweep's context anywhere (paths made absolute: a Ray worker may start
    elsewhere; on a cluster they must name the same files on every node). `stamps` (size and modification
    time of the files named) changes the spec's digest when a file changes, so no worker reuses a stale model."""
    stamps = {}

    def where(text, keywords=()):
        path = Path(str(text)).expanduser()
        if text in keywords or not path.exists():
            return text
        files = sorted(p for p in path.rglob("*") if p.is_file())[:1000] if path.is_dir() else [path]
        stamps[str(path.resolve())] = [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in files]
        return str(path.resolve())
    return {"model": where(model_spec, ALIASES), "device": device, "dtype": dtype, "data": where(data, ("imdb", "hf")),
            "eval_size": eval_size, "split": split, "calib_size": calib_size, "calib_max_length": calib_max_length,
            "calib_data": where(calib_data, ("imdb", "hf")), "seed": seed, "batch_size": batch_size,
            "max_length": max_length, "mode": mode, "compensate": compensate, "stamps": stamps}


def context_for(spec: dict) -> SweepContext:
    """The context for `spec`, built once per process: the model loaded and the calibration statistics
    computed on first use, then shared by every point this process runs (a Ray worker keeps one)."""
    key = settings_digest(spec)
    if key not in _CONTEXTS:
        _CONTEXTS.clear()
        loaded = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
        eval_data = evaluation_set(loaded, spec["data"], spec["eval_size"], spec["split"])
        calib = make_calibration(loaded, spec["calib_size"], spec["calib_max_length"], spec["seed"],
                                 spec["calib_data"], exclude=eval_data.texts)
        _CONTEXTS[key] = SweepContext(loaded, eval_data, calib, metric_name(loaded.kind))
    return _CONTEXTS[key]


def run_point(spec: dict, point: dict) -> dict:
    """One point: prune_step on a copy of the dense model, then evaluate. Returns {row, plan, calib_stats_s}.
    prune_s follows calib.charged(): what a standalone `prune` would pay, statistics computed by an earlier
    point of this process charged at their own cost, so local and Ray rows are comparable."""
    ctx = context_for(spec)
    target = point.get("target")
    res = prune_step(ctx.loaded, ctx.calib, point["method"], sparsity=point["sparsity"], params=point["params"],
                     compensate=spec["compensate"], mode="physical" if target else spec["mode"], target=target,
                     quantize=spec.get("quantize"))
    plan = res.plan
    result = evaluate(res.loaded, ctx.eval_data, spec["batch_size"], spec["max_length"], progress=False)
    row = _row(res.loaded, result, ctx.metric, method=point["method"],
               sparsity=plan.sparsity if point["sparsity"] is None else point["sparsity"],
               target_sparsity=point["sparsity"], achieved_sparsity=plan.sparsity, mode=spec["mode"],
               neurons_removed=plan.neurons_removed, neurons_removed_per_layer=plan.removed_per_layer,
               prune_s=res.prune_s, plan_params=_brief(plan.params), label=point["label"], seed=point.get("seed"),
               plan=f"plans/{point['index']:02d}-{point['method']}.json", compensated=res.compensation is not None,
               heads_removed=res.plan.heads_removed if res.plan.heads is not None else 0, quantize=res.quantize)
    if res.cost_model:
        row.update(target=target, predicted_cost_ratio=res.cost_model["predicted"] / res.cost_model["dense"])
    if res.compensation:
        row["compensation"] = res.compensation
    return {"row": row, "plan": plan.to_dict(), "calib_stats_s": dict(ctx.calib.timings)}


def _failed(pt: dict, error: str) -> dict:
    return {"point": pt["index"], "method": pt["method"], "sparsity": pt["sparsity"], "target_sparsity": pt["sparsity"],
            "seed": pt.get("seed"), "label": pt["label"], "params": pt["params"], "error": error}


# --- the sweep --------------------------------------------------------------------------------------

def run_sweep(model_spec: str, methods: Sequence[str] = DEFAULT_METHODS,
              sparsities: Sequence[float] = DEFAULT_SPARSITIES, mode: str = "mask", out_dir: str | Path = "runs/sweep",
              eval_size: int = 1000, data: str = "imdb", config: str | Path | None = None, split: str = "test",
              params: dict[str, dict] | None = None, compensate: bool = False, calib_size: int = CALIB_SIZE,
              calib_max_length: int = CALIB_MAX_LENGTH, calib_data: str | None = None, batch_size: int = 32,
              max_length: int | None = None, seed: int = 0, device: str | None = None,
              reference: dict | None = None, figures: bool = True, resume: bool = True,
              progress: bool = True, force: bool = False, dtype: str | None = None, seeds: int = 5,
              executor: str = "local", address: str | None = None, num_cpus_per_task: float = 1,
              num_gpus_per_task: float = 0, ray_init: dict | None = None, targets: Sequence[dict] = (),
              quantize: str | None = None) -> list[dict]:
    """Evaluate every (method, sparsity) and the config's rows on the same texts; write `out_dir`.

    params: extra parameters per method name (e.g. {"strategy": {"beta": 0.0}}). A sparsity of 0 is the
    dense baseline, evaluated once. reference: the paper's points to draw (default: PAPER_BERT_IMDB for
    classifiers). seeds: how many seeds a stochastic method (random) runs at each point. executor, address,
    num_cpus_per_task, num_gpus_per_task, ray_init (extra ray.init arguments): where the points run (see the
    module doc); they do not change the results, so a sweep stopped under one executor resumes under another.
    targets: points pruned to a constraint rather than a sparsity ({"flops": f} or {"speedup": s}, see
    pipeline.step.check_target), by `calibrated` with heads and neurons together. quantize="int8" stacks
    int8 on every point. Returns the rows written to results.json, with an error entry ({point, method,
    sparsity, seed, label, params, error}) in the place of each point that failed.
    """
    targets = [check_target(t) for t in targets]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise UserError(f"--seeds must be a whole number in [1, 100], got {seeds}")
    check_sizes(calib_size=calib_size, calib_max_length=calib_max_length, batch_size=batch_size,
                max_length=max_length, eval_size=eval_size)
    check_mode(mode)
    calib_data = calib_data or (data if data in ("imdb", "hf") else "imdb")
    methods = list(methods)
    for m in methods:
        get_scorer(m)
    sparsities = [check_sparsity(s) for s in sparsities]
    params = {k: dict(v) for k, v in (params or {}).items()}
    for name, p in params.items():
        check_params(name, p)
    cfg = load_config(config) if config else None
    if not cfg and not targets and not (methods and any(s > 0 for s in sparsities)):
        raise UserError("nothing to sweep: give --methods and non-zero --sparsities, or --config")
    settings = {"model": model_spec, "methods": methods, "sparsities": sparsities, "mode": mode,
                "config": cfg, "params": params, "compensate": compensate, "eval_size": eval_size, "data": data, "split": split,
                "calib_size": calib_size, "calib_max_length": calib_max_length, "calib_data": calib_data,
                "batch_size": batch_size, "max_length": max_length, "seed": seed, "seeds": seeds,
                **({"targets": targets} if targets else {}), **({"quantize": quantize} if quantize else {})}
    runner = make_executor(executor, address, num_cpus_per_task, num_gpus_per_task, device, ray_init)  # probes
    spec = context_spec(model_spec, device=device, dtype=dtype, data=data, eval_size=eval_size, split=split,
                        calib_size=calib_size, calib_max_length=calib_max_length, calib_data=calib_data, seed=seed,
                        batch_size=batch_size, max_length=max_length, mode=mode, compensate=compensate)
    spec["quantize"], spec["targets"] = quantize, targets
    try:
        with RunFolder(out_dir, "sweep", settings, force=force) as rf, runner:
            return _sweep(rf, runner, spec, settings, methods, sparsities, params, cfg, seeds, reference, figures,
                          resume, progress)
    finally:
        _CONTEXTS.clear()  # the driver's model and statistics go with the sweep


def _sweep(rf: RunFolder, runner, spec: dict, settings: dict, methods: list, sparsities: list, params: dict,
           cfg: dict | None, seeds: int, reference: dict | None, figures: bool, resume: bool,
           progress: bool) -> list[dict]:
    ctx = context_for(spec)
    loaded, eval_data, calib, metric = ctx.loaded, ctx.eval_data, ctx.calib, ctx.metric
    points = [{"method": m, "sparsity": s, "params": {**params.get(m, {}), **({"seed": k} if k is not None else {})},
               "label": None, "seed": k}
              for m in methods for s in sparsities if s > 0
              for k in (range(seeds) if get_scorer(m).stochastic and "seed" not in params.get(m, {}) else [None])]
    if cfg:
        points += config_points(cfg, loaded)
    points += [{"method": "calibrated", "sparsity": None, "params": {}, "target": t, "seed": None,
                "label": f"target {'flops' if 'flops' in t else 'speedup'} {t.get('flops', t.get('speedup'))}"}
               for t in spec.get("targets") or []]
    points = [{**pt, "index": i} for i, pt in enumerate(points)]
    dense, done = _resumable(rf.read_resume() if resume else None, points)
    resumed = len(done)
    if dense is not None:
        log.info("resuming the stopped sweep in %s: %d of %d points done", rf.path, resumed, len(points))
    else:
        done = {}
        result = evaluate(loaded, eval_data, spec["batch_size"], spec["max_length"], progress=False)
        dense = _row(loaded, result, metric, method="dense", sparsity=0.0, target_sparsity=0.0,
                     achieved_sparsity=0.0, mode=spec["mode"], neurons_removed=0,
                     neurons_removed_per_layer=[0] * len(ffn_sites(loaded.model)), prune_s=0.0,
                     plan_params={}, label=None, compensated=False, seed=None)
        log.info("dense: %s %.4f, %.1f s", metric, dense[metric], dense["latency_s"])
    failed: dict[int, dict] = {}
    stats_s: dict = {}
    todo = [(i, pt) for i, pt in enumerate(points) if i not in done]
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
            log.info("%s at %.2f: %s %.4f, %.1f s (prune %.2f s)", pt["method"], row["sparsity"], metric,
                     row[metric], row["latency_s"], row["prune_s"])
    if not done:
        first = failed[min(failed)]
        raise UserError(f"every point of the sweep failed, nothing written (point {first['point']}, "
                        f"{first['method']}: {first['error']})")
    if failed:
        log.warning("%d of %d points failed; the others are in results.json, the failed ones under 'failed' in "
                    "sweep.json", len(failed), len(points))
    rows = [dense] + [done[i][0] for i in sorted(done)]
    if reference is None and loaded.kind == "classifier":
        reference = PAPER_BERT_IMDB
    summary = {**settings, "base_model": loaded.base_spec, "kind": loaded.kind, "metric": metric,
               "eval_size": len(eval_data), "calib_size": len(calib.texts), "calib_max_length": calib.max_length,
               "calib_stats_s": {**stats_s, **calib.timings}, "peak_mem_mb": peak_mem_mb(),
               "runtime": {k: dense.get(k) for k in ("device", "device_name", "threads", "torch")},
               "reference": reference, "resumed_after": resumed, "computed": len(todo) - len(failed),
               "executor": runner.info(), "failed": [failed[i] for i in sorted(failed)], "created": now_iso()}
    rf.write_json("results.json", [{k: v for k, v in r.items() if k != "correct"} for r in rows])
    rf.write_json("predictions.json", {"note": "per row of results.json (same order): 1 where the review was "
                                       "classified correctly", "rows": [r.get("correct") for r in rows]})
    rf.write_json("aggregate.json", aggregate(rows, metric))
    rf.write_json("sweep.json", summary)
    plan_dir = rf.stage_dir("plans")
    for i in sorted(done):
        PruningPlan.from_dict(done[i][1]).save(plan_dir / f"{i:02d}-{points[i]['method']}.json")
    if figures:
        draw_sweep_figures([{k: v for k, v in r.items() if k != "correct"} for r in rows], rf.stage_dir("figures"),
                           reference=reference)
    return [dense] + [done[i][0] if i in done else failed[i] for i in range(len(points)) if i in done or i in failed]


def draw_sweep_figures(rows: list[dict], folder: str | Path, reference: dict | None = None) -> list[Path]:
    """Figures 4 / 5 (metric vs sparsity), 4-1 / 5-1 (time vs sparsity) and 4a (neurons pruned per layer)."""
    from ..plotting import pruning

    return [pruning.metric_vs_sparsity(rows, folder, reference=reference),
            pruning.latency_vs_sparsity(rows, folder),
            pruning.neurons_per_layer(rows, folder)]
