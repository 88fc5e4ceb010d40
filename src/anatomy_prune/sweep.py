"""`anatomy-prune sweep`: every (method, sparsity) on the same evaluation texts, and the report.

The model is loaded once; calibration statistics (similarities, activations, weight norms) are computed
once on the unpruned model and shared by all methods and sparsities. Between points the model is restored:
in mask mode its FFN weights are snapshotted and copied back after each point (cheap, no second model); in
physical mode each point prunes a deep copy of the dense model.

DIR/results.json is a list of rows, the dense baseline first (method "dense", sparsity 0):
  {method, sparsity, target_sparsity, achieved_sparsity, mode, accuracy | perplexity, latency_s, n_eval,
   neurons_removed, neurons_removed_per_layer, params, flops_per_token, prune_s, plan_params, label}
DIR/sweep.json records the settings, DIR/plans/ every plan, DIR/figures/ the figures (PNG + PDF).
A config file (TOML, e.g. configs/paper_figure5a.toml) adds rows with explicit method parameters.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .apply import mask, physical
from .errors import UserError
from .families import base_model, ffn_sites, get_module
from .io import atomic_dir, now_iso, read_json, write_json
from .methods import METHODS, get_method, make_plan, map_focus
from .models import Loaded, load_model
from .plan import check_sparsity
from .prune import (CALIB_MAX_LENGTH, CALIB_SIZE, check_mode, compensation_functions, evaluate_loaded,
                    evaluation_data, make_calibration, metric_name, peak_mem_mb, run_compensation,
                    wants_compensation)

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's, in a checkout
DEFAULT_METHODS = ("random", "magnitude", "strategy", "activation")
DEFAULT_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)

# The first paper's numbers: BERT-base fine-tuned on IMDB, 1,000 test reviews, no retraining (section 5.3).
PAPER_BERT_IMDB = {"label": "paper, BERT-base", "dense": 0.852,
                   "points": [{"method": "strategy", "sparsity": 0.3, "accuracy": 0.851},
                              {"method": "strategy", "sparsity": 0.7, "accuracy": 0.780},
                              {"method": "random", "sparsity": 0.5, "accuracy": 0.582}]}


# --- inputs ---------------------------------------------------------------------------------------

def parse_list(text: str | Sequence, what: str, cast=str) -> list:
    """'a,b,c' (or a list) -> [cast(a), ...]; a one-line UserError for an item that is not a `what`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s != ""]
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise UserError(f"--{what}: expected a comma-separated list of numbers, got '{text}'") from None


def load_config(path: str | Path) -> dict:
    """A sweep config (TOML): `focus_depth` and a list of `[[row]]` tables, each with `method`, optional
    `family` (encoder / decoder: rows for the other family are skipped), `sparsity` or method parameters
    (`alpha`, `beta`, `focus` given for a `focus_depth`-block model), and an optional `label`."""
    p = Path(path)
    if not p.is_file() and (CONFIGS / p.name).is_file():  # a bare name finds the repository's configs/
        p = CONFIGS / p.name
    if not p.is_file():
        raise UserError(f"config file '{path}' not found; see configs/paper_figure5a.toml")
    try:
        cfg = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file '{path}' is not valid TOML ({exc})") from None
    rows = cfg.get("row")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"config file '{path}' has no [[row]] tables")
    for i, row in enumerate(rows, 1):
        if "method" not in row:
            raise UserError(f"config '{path}' row {i} has no method")
        get_method(row["method"])
        if row.get("family", "encoder") not in ("encoder", "decoder", "any"):
            raise UserError(f"config '{path}' row {i}: family must be encoder, decoder or any")
        if "sparsity" in row:
            check_sparsity(row["sparsity"])
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
            params["focus"] = map_focus(params["focus"], n_layers, depth)
        label = row.get("label") or ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("method", "family"))
        points.append({"method": row["method"], "sparsity": row.get("sparsity"), "params": params, "label": label})
    if not points:
        raise UserError(f"the config has no rows for a {family}; add rows with family = \"{family}\"")
    return points


# --- restoring the model between points ---------------------------------------------------------------

def ffn_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every FFN projection's parameters (what mask and compensation change), by full name."""
    base = base_model(model)
    snap = {}
    for site in ffn_sites(model):
        for path in site.up + (site.down,):
            for name, p in get_module(base, path).named_parameters():
                snap[f"{path}.{name}"] = p.detach().clone()
    return snap


@torch.no_grad()
def ffn_restore(model: nn.Module, snap: dict[str, Tensor]) -> None:
    base = base_model(model)
    for full, value in snap.items():
        path, _, name = full.rpartition(".")
        getattr(get_module(base, path), name).copy_(value)


# --- the sweep --------------------------------------------------------------------------------------

def run_sweep(model_spec: str, methods: Sequence[str] = DEFAULT_METHODS,
              sparsities: Sequence[float] = DEFAULT_SPARSITIES, mode: str = "mask", out_dir: str | Path = "runs/sweep",
              eval_size: int = 1000, data: str = "imdb", config: str | Path | None = None,
              params: dict[str, dict] | None = None, compensate: bool = False, calib_size: int = CALIB_SIZE,
              calib_max_length: int = CALIB_MAX_LENGTH, calib_data: str = "imdb", batch_size: int = 32,
              max_length: int | None = None, seed: int = 0, device: str | None = None,
              reference: dict | None = None, figures: bool = True, resume: bool = True,
              progress: bool = True) -> list[dict]:
    """Evaluate every (method, sparsity) and the config's rows on the same texts; write `out_dir`.

    params: extra parameters per method name (e.g. {"strategy": {"beta": 0.0}}). A sparsity of 0 is the
    dense baseline, evaluated once. reference: the paper's points to draw (default: PAPER_BERT_IMDB for
    classifiers). Returns the rows written to results.json.

    Each finished point is also kept in `.<out>.partial.json` beside `out_dir` (out_dir itself is written only
    at the end, atomically); with `resume`, a sweep with the same settings that was stopped starts again
    after its last finished point. The file is removed when the sweep completes.
    """
    check_mode(mode)
    methods = list(methods)
    for m in methods:
        get_method(m)
    sparsities = [check_sparsity(s) for s in sparsities]
    params = {k: dict(v) for k, v in (params or {}).items()}
    for name, p in params.items():
        unknown = set(p) - set(get_method(name).params)
        if unknown:
            raise UserError(f"method '{name}' has no parameter(s) {sorted(unknown)}; it takes "
                            f"{sorted(get_method(name).params)}")
    cfg = load_config(config) if config else None
    if not cfg and not (methods and any(s > 0 for s in sparsities)):
        raise UserError("nothing to sweep: give --methods and non-zero --sparsities, or --config")
    if compensate:
        compensation_functions()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a folder; choose another --out")

    partial = out.parent / f".{out.name}.partial.json"
    settings_key = {"model": model_spec, "methods": methods, "sparsities": sparsities, "mode": mode, "config": str(config),
           "params": params, "compensate": compensate, "eval_size": eval_size, "data": data, "calib_size": calib_size,
           "calib_max_length": calib_max_length, "calib_data": calib_data, "batch_size": batch_size,
           "max_length": max_length, "seed": seed}
    done = _read_partial(partial, settings_key) if resume else None
    resumed_after = len(done["rows"]) - 1 if done else 0

    loaded = load_model(model_spec, device=device)
    eval_data = evaluation_data(loaded, data, eval_size)
    calib = make_calibration(loaded, calib_size, calib_max_length, seed, calib_data, exclude=eval_data.texts)
    metric = metric_name(loaded.kind)
    points = [{"method": m, "sparsity": s, "params": params.get(m, {}), "label": None}
              for m in methods for s in sparsities if s > 0]
    if cfg:
        points += config_points(cfg, loaded)

    dense_model = loaded.model
    snap = ffn_snapshot(dense_model) if mode == "mask" else None
    if done:
        rows, plans = done["rows"], done["plans"]
        log.info("resuming the stopped sweep in %s after %d of %d points", partial, len(rows) - 1, len(points))
    else:
        rows = [_row(loaded, evaluate_loaded(loaded, eval_data, batch_size, max_length, progress=False), metric,
                     method="dense", sparsity=0.0, target=0.0, mode=mode, neurons_removed=0,
                     removed_per_layer=[0] * len(ffn_sites(dense_model)), prune_s=0.0, plan_params={}, label=None)]
        plans = {}
        log.info("dense: %s %.4f, %.1f s", metric, rows[0][metric], rows[0]["latency_s"])
    for pt in tqdm(points[len(rows) - 1:], desc="sweep", disable=not progress):
        calib.used.clear()
        before = set(calib.timings)
        start = time.perf_counter()
        plan = make_plan(pt["method"], calib, pt["sparsity"], **pt["params"])
        work = Loaded(copy.deepcopy(dense_model) if mode == "physical" else dense_model, loaded.tokenizer,
                      loaded.kind, loaded.spec, loaded.info)
        comp = run_compensation(loaded, calib, plan, model=work.model) if wants_compensation(plan, compensate) \
            else None
        wall = time.perf_counter() - start
        # charge every shared statistic this point used, as a standalone prune would pay for it
        fresh = sum(calib.timings[k] for k in set(calib.timings) - before)
        prune_s = wall - fresh + sum(calib.timings.get(k, 0.0) for k in calib.used)
        (mask if mode == "mask" else physical)(work.model, plan)
        result = evaluate_loaded(work, eval_data, batch_size, max_length, progress=False)
        row = _row(work, result, metric, method=pt["method"], sparsity=plan.sparsity if pt["sparsity"] is None
                   else pt["sparsity"], target=pt["sparsity"], mode=mode, neurons_removed=plan.neurons_removed,
                   removed_per_layer=plan.removed_per_layer, prune_s=prune_s, plan_params=_brief(plan.params),
                   label=pt["label"], achieved=plan.sparsity)
        rows.append(row)
        key = f"{pt['method']}_{len(plans):02d}"
        plans[key] = plan.to_dict()
        row["plan"] = f"plans/{key}.json"
        row["compensated"] = comp is not None
        if comp:
            row["compensation"] = comp
        if mode == "mask":
            ffn_restore(dense_model, snap)
            if hasattr(dense_model, "_anatomy_prune_compensated"):  # compensate.py's guard against twice
                del dense_model._anatomy_prune_compensated
        del work
        write_json(partial, {"key": settings_key, "rows": rows, "plans": plans})
        log.info("%s at %.2f: %s %.4f, %.1f s (prune %.2f s)", pt["method"], row["sparsity"], metric, row[metric],
                 row["latency_s"], prune_s)

    if reference is None and loaded.kind == "classifier":
        reference = PAPER_BERT_IMDB
    settings = {"model": model_spec, "base_model": loaded.base_spec, "kind": loaded.kind, "metric": metric,
                "methods": methods, "sparsities": sparsities, "mode": mode, "config": str(config) if config else None,
                "params": params, "compensate": compensate, "eval_size": len(eval_data), "data": data,
                "calib_size": len(calib.texts), "calib_max_length": calib.max_length, "calib_data": calib_data,
                "calib_stats_s": dict(calib.timings), "seed": seed, "peak_mem_mb": peak_mem_mb(),
                "runtime": {k: rows[0].get(k) for k in ("device", "device_name", "threads", "torch")},
                "reference": reference, "resumed_after": resumed_after,
                "created": now_iso()}
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", rows)
        write_json(tmp / "sweep.json", settings)
        for key, plan in plans.items():
            write_json(tmp / "plans" / f"{key}.json", plan)
        if figures:
            draw_sweep_figures(rows, tmp / "figures", reference=reference)
    partial.unlink(missing_ok=True)
    return rows


def _read_partial(path: Path, key: dict) -> dict | None:
    """The finished points of a stopped sweep with the same settings, or None."""
    if not path.is_file():
        return None
    try:
        done = read_json(path)
    except UserError:
        return None
    if json.loads(json.dumps(key)) != done.get("key") or not done.get("rows"):
        log.info("ignoring %s: it is from a sweep with other settings", path)
        return None
    return done


def _brief(params: dict) -> dict:
    """Plan parameters worth a results row (long per-layer lists stay in the plan files)."""
    return {k: v for k, v in params.items() if k not in ("thresholds", "layer_sim", "rule_removed_per_layer")}


def _row(loaded: Loaded, result: dict, metric: str, *, method: str, sparsity: float, target: float | None,
         mode: str, neurons_removed: int, removed_per_layer: list[int], prune_s: float, plan_params: dict,
         label: str | None, achieved: float = 0.0) -> dict:
    from .evaluate import count_params, ffn_flops_per_token, flops_per_token

    return {"method": method, "sparsity": float(sparsity), "target_sparsity": target,
            "achieved_sparsity": float(achieved), "mode": mode, metric: result[metric],
            "latency_s": result["latency_s"], "n_eval": result["n_eval"], "neurons_removed": neurons_removed,
            "neurons_removed_per_layer": removed_per_layer, "params": count_params(loaded.model),
            "flops_per_token": flops_per_token(loaded.model), "ffn_flops_per_token": ffn_flops_per_token(loaded.model),
            "prune_s": prune_s, "plan_params": plan_params, "label": label, "compensated": False,
            **{k: result[k] for k in ("device", "device_name", "threads") if k in result}}


def draw_sweep_figures(rows: list[dict], folder: str | Path, reference: dict | None = None) -> list[Path]:
    """Figures 4 / 5 (metric vs sparsity), 4-1 / 5-1 (time vs sparsity) and 4a (neurons pruned per layer)."""
    from .plotting import pruning

    return [pruning.metric_vs_sparsity(rows, folder, reference=reference),
            pruning.latency_vs_sparsity(rows, folder),
            pruning.neurons_per_layer(rows, folder)]


def redraw(sweep_dir: str | Path) -> list[Path]:
    """Draw a sweep folder's figures again from its results.json (no model needed)."""
    d = Path(sweep_dir)
    rows = read_json(d / "results.json")
    settings = read_json(d / "sweep.json") if (d / "sweep.json").is_file() else {}
    return draw_sweep_figures(rows, d / "figures", reference=settings.get("reference"))


# --- the report ----------------------------------------------------------------------------------------

def write_report(sweep_dir: str | Path, out_md: str | Path, title: str = "Pruning sweep") -> Path:
    """A short markdown report of a sweep folder: settings, the table, the paper beside ours, figure links."""
    import os

    d = Path(sweep_dir)
    rows = read_json(d / "results.json")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"'{d / 'results.json'}' has no rows; run anatomy-prune sweep first")
    settings = read_json(d / "sweep.json") if (d / "sweep.json").is_file() else {}
    metric = "accuracy" if "accuracy" in rows[0] else "perplexity"
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out_md = Path(out_md)
    rel = Path(os.path.relpath(d, out_md.parent))

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [f"# {title}", ""]
    if settings:
        rt = settings.get("runtime") or {}
        lines += [f"Model `{settings.get('model')}` ({settings.get('kind')}), {settings.get('eval_size')} evaluation "
                  f"texts, mode `{settings.get('mode')}`, calibration {settings.get('calib_size')} training reviews x "
                  f"{settings.get('calib_max_length')} tokens, seed {settings.get('seed')}; "
                  f"{rt.get('device')} ({rt.get('device_name')}, {rt.get('threads')} threads), {settings.get('created')}.",
                  ""]
    head = "accuracy %" if metric == "accuracy" else "perplexity"
    delta = "vs dense (pts)" if metric == "accuracy" else "vs dense (x)"
    lines += [f"| method | sparsity | {head} | {delta} | latency s | params M | FLOPs/token M | prune s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" ({r['label']})" if r.get("label") else "")
        if metric == "accuracy":
            val = pct(r[metric])
            dv = f"{100 * (r[metric] - dense[metric]):+.1f}" if dense else ""
        else:
            val = f"{r[metric]:.2f}"
            dv = f"{r[metric] / dense[metric]:.2f}" if dense else ""
        lines.append(f"| {name} | {r['sparsity']:.2f} | {val} | {dv} | {r['latency_s']:.2f} | "
                     f"{r['params'] / 1e6:.2f} | {r['flops_per_token'] / 1e6:.1f} | {r['prune_s']:.2f} |")
    ref = settings.get("reference")
    if ref and dense and metric == "accuracy":
        lines += ["", f"The paper ({ref['label']}, dense {pct(ref['dense'])}%) beside ours "
                  f"(dense {pct(dense[metric])}%), points lost:", "",
                  "| method | sparsity | paper | ours |", "|---|---|---|---|"]
        for p in ref["points"]:
            ours = [r for r in rows if r["method"] == p["method"] and not r.get("label")
                    and abs(r["sparsity"] - p["sparsity"]) < 1e-6]
            mine = f"{100 * (ours[0][metric] - dense[metric]):+.1f}" if ours else "not run"
            lines.append(f"| {p['method']} | {p['sparsity']:.0%} | {100 * (p['accuracy'] - ref['dense']):+.1f} | {mine} |")
    figs = sorted((d / "figures").glob("*.png")) if (d / "figures").is_dir() else []
    if figs:
        lines += ["", "Figures:", ""] + [f"![{f.stem}]({(rel / 'figures' / f.name).as_posix()})" for f in figs]
    lines += ["", "Latency is wall-clock time of the forward passes over the evaluation texts; on a shared CPU it "
              "is noisy. Mask mode zeroes neurons (same shapes, no speedup expected); physical mode removes them."]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_md.with_suffix(out_md.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_md)
    return out_md


def method_names() -> list[str]:
    return sorted(METHODS)
