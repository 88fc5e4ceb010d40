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
starts again after its last finished point.
"""
from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..apply.modes import check_mode
from ..data.splits import CALIB_SIZE
from ..errors import UserError
from ..evaluate.counts import count_params, ffn_flops_per_token, flops_per_token
from ..evaluate.metrics import evaluate, evaluation_set, metric_name
from ..evaluate.stats import mcnemar, seed_summary
from ..evaluate.timing import peak_mem_mb
from ..models.families import ffn_sites
from ..models.loading import Loaded, load_model
from ..plan.plan import PruningPlan, check_sparsity
from ..resources import config_path
from ..runfolder import RunFolder, now_iso
from ..scores.calibration import CALIB_MAX_LENGTH, make_calibration
from ..scores.registry import check_params, get_scorer
from ..scores.strategy import map_focus
from .step import prune_step

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


def _resumable(done: dict | None, points: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows and plans of a stopped sweep that match the points about to run (checked, never trusted)."""
    if not done or not isinstance(done.get("rows"), list) or not isinstance(done.get("plans"), list):
        return [], []
    rows, plans = done["rows"], done["plans"]
    if not rows or len(rows) - 1 != len(plans) or len(plans) > len(points):
        return [], []
    if not all(isinstance(r, dict) for r in rows) or rows[0].get("method") != "dense":
        return [], []
    try:
        checked = [PruningPlan.from_dict(p).to_dict() for p in plans]
    except UserError:
        return [], []
    if any((r.get("method"), r.get("target_sparsity"), r.get("seed")) != (pt["method"], pt["sparsity"], pt.get("seed"))
           for r, pt in zip(rows[1:], points)):
        return [], []
    return rows, checked


# --- the sweep --------------------------------------------------------------------------------------

def run_sweep(model_spec: str, methods: Sequence[str] = DEFAULT_METHODS,
              sparsities: Sequence[float] = DEFAULT_SPARSITIES, mode: str = "mask", out_dir: str | Path = "runs/sweep",
              eval_size: int = 1000, data: str = "imdb", config: str | Path | None = None, split: str = "test",
              params: dict[str, dict] | None = None, compensate: bool = False, calib_size: int = CALIB_SIZE,
              calib_max_length: int = CALIB_MAX_LENGTH, calib_data: str | None = None, batch_size: int = 32,
              max_length: int | None = None, seed: int = 0, device: str | None = None,
              reference: dict | None = None, figures: bool = True, resume: bool = True,
              progress: bool = True, force: bool = False, dtype: str | None = None, seeds: int = 5) -> list[dict]:
    """Evaluate every (method, sparsity) and the config's rows on the same texts; write `out_dir`.

    params: extra parameters per method name (e.g. {"strategy": {"beta": 0.0}}). A sparsity of 0 is the
    dense baseline, evaluated once. reference: the paper's points to draw (default: PAPER_BERT_IMDB for
    classifiers). seeds: how many seeds a stochastic method (random) runs at each point. Returns the rows
    written to results.json.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise UserError(f"--seeds must be a whole number in [1, 100], got {seeds}")
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
    if not cfg and not (methods and any(s > 0 for s in sparsities)):
        raise UserError("nothing to sweep: give --methods and non-zero --sparsities, or --config")
    settings = {"model": model_spec, "methods": methods, "sparsities": sparsities, "mode": mode,
                "config": cfg, "params": params, "compensate": compensate, "eval_size": eval_size, "data": data, "split": split,
                "calib_size": calib_size, "calib_max_length": calib_max_length, "calib_data": calib_data,
                "batch_size": batch_size, "max_length": max_length, "seed": seed, "seeds": seeds}
    with RunFolder(out_dir, "sweep", settings, force=force) as rf:
        loaded = load_model(model_spec, device=device, dtype=dtype)
        eval_data = evaluation_set(loaded, data, eval_size, split)
        calib = make_calibration(loaded, calib_size, calib_max_length, seed, calib_data, exclude=eval_data.texts)
        metric = metric_name(loaded.kind)
        points = [{"method": m, "sparsity": s, "params": {**params.get(m, {}), **({"seed": k} if k is not None else {})},
                   "label": None, "seed": k}
                  for m in methods for s in sparsities if s > 0
                  for k in (range(seeds) if get_scorer(m).stochastic and "seed" not in params.get(m, {}) else [None])]
        if cfg:
            points += config_points(cfg, loaded)
        rows, plans = _resumable(rf.read_resume() if resume else None, points)
        resumed_after = max(0, len(rows) - 1)
        if rows:
            log.info("resuming the stopped sweep in %s after %d of %d points", rf.path, resumed_after, len(points))
        else:
            dense = evaluate(loaded, eval_data, batch_size, max_length, progress=False)
            rows = [_row(loaded, dense, metric, method="dense", sparsity=0.0, target_sparsity=0.0,
                         achieved_sparsity=0.0, mode=mode, neurons_removed=0,
                         neurons_removed_per_layer=[0] * len(ffn_sites(loaded.model)), prune_s=0.0,
                         plan_params={}, label=None, compensated=False, seed=None)]
            log.info("dense: %s %.4f, %.1f s", metric, rows[0][metric], rows[0]["latency_s"])
        for i, pt in enumerate(tqdm(points[len(plans):], desc="sweep", disable=not progress), start=len(plans)):
            res = prune_step(loaded, calib, pt["method"], sparsity=pt["sparsity"], params=pt["params"],
                             compensate=compensate, mode=mode)
            plan = res.plan
            result = evaluate(res.loaded, eval_data, batch_size, max_length, progress=False)
            row = _row(res.loaded, result, metric, method=pt["method"],
                       sparsity=plan.sparsity if pt["sparsity"] is None else pt["sparsity"],
                       target_sparsity=pt["sparsity"], achieved_sparsity=plan.sparsity, mode=mode,
                       neurons_removed=plan.neurons_removed, neurons_removed_per_layer=plan.removed_per_layer,
                       prune_s=res.prune_s, plan_params=_brief(plan.params), label=pt["label"], seed=pt.get("seed"),
                       plan=f"plans/{i:02d}-{pt['method']}.json", compensated=res.compensation is not None)
            if "correct" in row and "correct" in rows[0]:
                row["vs_dense"] = mcnemar(row["correct"], rows[0]["correct"])
            if res.compensation:
                row["compensation"] = res.compensation
            rows.append(row)
            plans.append(plan.to_dict())
            del res
            rf.write_resume({"rows": rows, "plans": plans})
            log.info("%s at %.2f: %s %.4f, %.1f s (prune %.2f s)", pt["method"], row["sparsity"], metric,
                     row[metric], row["latency_s"], row["prune_s"])

        if reference is None and loaded.kind == "classifier":
            reference = PAPER_BERT_IMDB
        summary = {**settings, "base_model": loaded.base_spec, "kind": loaded.kind, "metric": metric,
                   "eval_size": len(eval_data), "calib_size": len(calib.texts), "calib_max_length": calib.max_length,
                   "calib_stats_s": dict(calib.timings), "peak_mem_mb": peak_mem_mb(),
                   "runtime": {k: rows[0].get(k) for k in ("device", "device_name", "threads", "torch")},
                   "reference": reference, "resumed_after": resumed_after, "created": now_iso()}
        rf.write_json("results.json", [{k: v for k, v in r.items() if k != "correct"} for r in rows])
        rf.write_json("predictions.json", {"note": "per row of results.json (same order): 1 where the review was "
                                           "classified correctly", "rows": [r.get("correct") for r in rows]})
        rf.write_json("aggregate.json", aggregate(rows, metric))
        rf.write_json("sweep.json", summary)
        plan_dir = rf.stage_dir("plans")
        for i, (pt, plan) in enumerate(zip(points, plans)):
            PruningPlan.from_dict(plan).save(plan_dir / f"{i:02d}-{pt['method']}.json")
        if figures:
            draw_sweep_figures([{k: v for k, v in r.items() if k != "correct"} for r in rows], rf.stage_dir("figures"),
                               reference=reference)
    return rows


def draw_sweep_figures(rows: list[dict], folder: str | Path, reference: dict | None = None) -> list[Path]:
    """Figures 4 / 5 (metric vs sparsity), 4-1 / 5-1 (time vs sparsity) and 4a (neurons pruned per layer)."""
    from ..plotting import pruning

    return [pruning.metric_vs_sparsity(rows, folder, reference=reference),
            pruning.latency_vs_sparsity(rows, folder),
            pruning.neurons_per_layer(rows, folder)]
