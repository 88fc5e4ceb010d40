"""Reports: the markdown of a finished sweep and of the latency benchmark, and `make figures`, which gathers
the figures of finished runs into one folder. Everything here reads saved results; no model is needed.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..runfolder import RunFolder, read_json, write_text

log = logging.getLogger(__name__)


def write_report(sweep_dir: str | Path, out_md: str | Path | None, title: str = "Pruning sweep",
                 relative_to: str | Path | None = None) -> Path | str:
    """A short markdown report of a sweep folder: settings, the table, the paper beside ours, figure links.
    Written to `out_md` (returns its path), or returned as text when out_md is None (figure links then
    relative to `relative_to`)."""
    d = Path(sweep_dir)
    rows = read_json(d / "results.json", "sweep results")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"'{d / 'results.json'}' has no rows; run anatomy-prune sweep first")
    settings = read_json(d / "sweep.json") if (d / "sweep.json").is_file() else {}
    metric = "accuracy" if "accuracy" in rows[0] else "perplexity"
    dense = next((r for r in rows if r["method"] == "dense"), None)
    base = Path(out_md).parent if out_md is not None else Path(relative_to or d)
    rel = Path(os.path.relpath(d, base))

    lines = [f"# {title}", ""]
    if settings:
        rt = settings.get("runtime") or {}
        lines += [f"Model `{settings.get('model')}` ({settings.get('kind')}), {settings.get('eval_size')} evaluation "
                  f"texts, mode `{settings.get('mode')}`, calibration {settings.get('calib_size')} reviews x "
                  f"{settings.get('calib_max_length')} tokens, seed {settings.get('seed')}; "
                  f"{rt.get('device')} ({rt.get('device_name')}, {rt.get('threads')} threads), {settings.get('created')}.",
                  ""]
    lines += _rows_table(rows, metric, dense)
    if metric == "accuracy" and (d / "predictions.json").is_file():
        lines += ["", compare_methods(d)["markdown"]]
    lines += _paper_beside(settings.get("reference"), rows, dense, metric)
    figs = sorted((d / "figures").glob("*.png")) if (d / "figures").is_dir() else []
    if figs:
        lines += ["", "Figures:", ""] + [f"![{f.stem}]({(rel / 'figures' / f.name).as_posix()})" for f in figs]
    lines += ["", "Latency is wall-clock time of the forward passes over the evaluation texts; on a shared CPU it "
              "is noisy. Mask mode zeroes neurons (same shapes, no speedup expected); physical mode removes them."]
    text = "\n".join(lines) + "\n"
    if out_md is None:
        return text
    write_text(out_md, text)
    return Path(out_md)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _rows_table(rows: list[dict], metric: str, dense: dict | None) -> list[str]:
    """The sweep's table: one line per row, the metric with its interval and its difference from dense."""
    head = "accuracy % [95% interval]" if metric == "accuracy" else "perplexity"
    delta = "vs dense (pts)" if metric == "accuracy" else "vs dense (x)"
    lines = [f"| method | sparsity | {head} | {delta} | latency s | params M | FLOPs/token M | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" ({r['label']})" if r.get("label") else "") + \
            (f", seed {r['seed']}" if r.get("seed") is not None else "")
        if metric == "accuracy":
            iv = r.get("accuracy_interval")
            val = _pct(r[metric]) + (f" [{_pct(iv[0])}-{_pct(iv[1])}]" if iv else "")
            dv = f"{100 * (r[metric] - dense[metric]):+.1f}" if dense else ""
        else:
            val = f"{r[metric]:.2f}"
            dv = f"{r[metric] / dense[metric]:.2f}" if dense else ""
        lines.append(f"| {name} | {r['sparsity']:.2f} | {val} | {dv} | {r['latency_s']:.2f} | "
                     f"{r['params'] / 1e6:.2f} | {r['flops_per_token'] / 1e6:.1f} | {r['prune_s']:.2f} |")
    return lines


def _paper_beside(ref: dict | None, rows: list[dict], dense: dict | None, metric: str) -> list[str]:
    """The paper's points lost beside ours at the same method and sparsity (accuracy only)."""
    points = (ref or {}).get("points", [])
    ours_at = [[r for r in rows if r["method"] == p["method"] and not r.get("label")
                and abs(r["sparsity"] - p["sparsity"]) < 1e-6] for p in points]   # our rows at each paper point
    if not (ref and dense and metric == "accuracy" and any(ours_at)):
        return []
    lines = ["", f"The paper ({ref['label']}, dense {_pct(ref['dense'])}%) beside ours "
             f"(dense {_pct(dense[metric])}%), points lost:", "", "| method | sparsity | paper | ours |", "|---|---|---|---|"]
    for p, ours in zip(points, ours_at):
        mean = sum(r[metric] for r in ours) / len(ours) if ours else None
        mine = (f"{100 * (mean - dense[metric]):+.1f}" + (f" (mean of {len(ours)} seeds)" if len(ours) > 1 else "")
                if ours else "not run")
        lines.append(f"| {p['method']} | {p['sparsity']:.0%} | {100 * (p['accuracy'] - ref['dense']):+.1f} | {mine} |")
    return lines


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def markdown_table(result: dict, device: str = "cpu") -> str:
    """Speedup and parameter reduction at each sparsity (one table for `device`), as markdown.

    Columns: kept FFN width, parameters and their reduction, then per measured (batch, length) the physical
    model's speedup with its share of the FLOP bound, and the masked model's speedup at the reference shape.
    """
    rows = [r for r in result["rows"] if r["device"] == device]
    if not rows:
        raise UserError(f"no {device} rows in the result")
    shapes = sorted({(r["batch_size"], r["seq_len"]) for r in rows}, key=lambda x: (x[1], x[0]))
    ref = (32, 128) if (32, 128) in shapes else shapes[-1]
    sparsities = sorted({r["sparsity"] for r in rows})
    physical_names = sorted({r["variant"] for r in rows if r["variant"].startswith("physical")
                             and r["variant"] != "physical-strided"}, key=lambda v: (len(v), v))

    def get(s, variant, shape):
        for r in rows:
            if r["sparsity"] == s and r["variant"] == variant and (r["batch_size"], r["seq_len"]) == shape:
                return r
        return None

    head = ["FFN sparsity", "kept FFN width", "params (reduction)", "non-embedding params removed"]
    for b, n in shapes:
        head.append(f"physical b{b}/L{n}: speedup (of ideal)")
    head.append(f"masked b{ref[0]}/L{ref[1]}")
    for name in physical_names[1:]:
        head.append(f"{name} b{ref[0]}/L{ref[1]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sparsities:
        p = get(s, "physical", ref)
        widths = sorted(set(p["ffn_widths"]))
        cells = [f"{s:.0%}" if abs(s * 100 - round(s * 100)) < 1e-9 else f"{s:.3g}",
                 "/".join(map(str, widths)),
                 f"{_fmt_params(p['params'])} (-{p['param_reduction']:.1%})",
                 f"{p['nonembedding_param_reduction']:.1%}"]
        for shape in shapes:
            r = get(s, "physical", shape)
            cells.append(f"{r['speedup']:.2f}x ({r['efficiency']:.0%} of {r['ideal_speedup']:.2f}x)" if r else "")
        m = get(s, "mask", ref)
        cells.append(f"{m['speedup']:.2f}x" if m else "")
        for name in physical_names[1:]:
            r = get(s, name, ref)
            cells.append(f"{r['speedup']:.2f}x ({r['efficiency']:.0%} of {r['ideal_speedup']:.2f}x), "
                         f"width {'/'.join(map(str, sorted(set(r['ffn_widths']))))}" if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect_figures(runs: Sequence[str | Path], out: str | Path, force: bool = False) -> list[Path]:
    """Copy every PNG under each run's `figures/` folders into `out` (a run folder of its own), named after
    the folder it came from; anatomy figures are redrawn from their saved files. Nothing is written into
    the runs, and a symbolic link inside them is never followed."""
    from .anatomy import redraw_anatomy_figures

    runs = [Path(r) for r in runs]
    for run in runs:
        if run.is_symlink():
            raise UserError(f"run folder '{run}' is a symbolic link, which anatomy-prune does not follow; give the "
                            "folder it points to")
        if not run.is_dir():
            raise UserError(f"run folder '{run}' not found; run `make demo` (or the command that writes it) first")
    written: list[Path] = []
    with RunFolder(out, "figures", {"runs": [str(r) for r in runs]}, force=force) as rf:
        for run in runs:
            for fig_dir in sorted(_figure_dirs(run)):
                prefix = "_".join((run.name, *fig_dir.parent.relative_to(run).parts))
                if (fig_dir.parent / "layer_similarity.json").is_file():
                    pngs = redraw_anatomy_figures(fig_dir.parent, rf.scratch(prefix))
                else:
                    pngs = sorted(p for p in fig_dir.glob("*.png") if p.is_file() and not p.is_symlink())
                for png in pngs:
                    name = f"{prefix}_{png.name}"
                    shutil.copyfile(png, rf.stage(name))
                    written.append(rf.path / name)
    log.info("collected %d figures into %s", len(written), out)
    return written


def _figure_dirs(run: Path) -> list[Path]:
    """Real (not linked) `figures` folders under a run, model folders excluded; links never followed."""
    found = []
    for root, dirs, _files in os.walk(run, followlinks=False):
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink() and d != "model" and not d.startswith(".")]
        if Path(root).name == "figures":
            found.append(Path(root))
    return found


def compare_methods(sweep_dir: str | Path, level: float = 0.95) -> dict:
    """Paired comparisons of a finished sweep (same reviews for every row): at each sparsity, every method
    against dense and against the best method there, by McNemar's exact test, with Holm's correction over the
    comparisons of the table. Seeded methods are compared seed by seed against the best; the table reports
    their worst (largest) p-value. Returns {"level", "rows": [...], "markdown"}."""
    from ..evaluate.stats import check_level, mcnemar

    level = check_level(level)
    d = Path(sweep_dir)
    rows = read_json(d / "results.json", "sweep results")
    pred = read_json(d / "predictions.json", "sweep predictions").get("rows")
    if not isinstance(rows, list) or not isinstance(pred, list) or len(pred) != len(rows) or "accuracy" not in rows[0]:
        raise UserError(f"'{d}' has no per-review predictions of a classifier sweep; run the sweep again")
    dense_ok = pred[0]
    by_point: dict = {}
    for r, p in zip(rows[1:], pred[1:]):
        # variants of one sparsity (ablation labels) compete with each other; cost targets form their own group
        label = r.get("label") or None
        target = label if label and label.startswith("target ") else None
        key = (round(r["sparsity"] if r.get("target_sparsity") is None else r["target_sparsity"], 4), target)
        name = r["method"] if target or not label else f"{r['method']} ({label})"
        by_point.setdefault(key, {}).setdefault(name, []).append((r, p))
    out, tests = [], []
    for (s, label), methods in sorted(by_point.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        mean = {m: sum(r["accuracy"] for r, _ in v) / len(v) for m, v in methods.items()}
        best = max(mean, key=mean.get)
        best_ok = methods[best][0][1]
        for m, v in methods.items():
            vs_dense = [mcnemar(p, dense_ok) for _, p in v]
            vs_best = [mcnemar(p, best_ok) for _, p in v] if m != best else []
            entry = {"sparsity": s, "label": label, "method": m, "accuracy": mean[m], "n_seeds": len(v),
                     "best": m == best, "vs_dense_diff": sum(t["diff"] for t in vs_dense) / len(v),
                     "vs_dense_p": max(t["p_value"] for t in vs_dense),
                     "vs_best_diff": (sum(t["diff"] for t in vs_best) / len(v)) if vs_best else 0.0,
                     "vs_best_p": max(t["p_value"] for t in vs_best) if vs_best else None}
            out.append(entry)
            tests.append((entry, "vs_dense_p"))
            if vs_best:
                tests.append((entry, "vs_best_p"))
    _holm(tests, 1 - level)
    n = len(tests)
    lines = [f"Paired comparisons on the same {len(dense_ok)} reviews (McNemar's exact test, Holm-corrected over "
             f"{n} tests, {int(level * 100)}% level). A seeded method counts as different only if every seed is: "
             "its p-value is the largest over its seeds. 'indistinguishable' = not supported by the test.", "",
             "| sparsity | method | accuracy % | vs dense (pts) | vs dense | vs best at this sparsity |",
             "|---|---|---|---|---|---|"]
    for e in out:
        name = e["method"] + (f" ({e['label']})" if e["label"] else "") + (f", {e['n_seeds']} seeds" if e["n_seeds"] > 1 else "")
        vd = f"p={e['vs_dense_p_holm']:.2g} " + ("**supported**" if e["vs_dense_supported"] else "indistinguishable")
        vb = "best" if e["best"] else (f"{100 * e['vs_best_diff']:+.1f} pts, p={e['vs_best_p_holm']:.2g} " +
                                       ("**supported**" if e["vs_best_supported"] else "indistinguishable"))
        lines.append(f"| {e['sparsity']:.0%} | {name} | {100 * e['accuracy']:.1f} | {100 * e['vs_dense_diff']:+.1f} | "
                     f"{vd} | {vb} |")
    return {"level": level, "n_tests": n, "rows": out, "markdown": "\n".join(lines) + "\n"}


def _holm(tests: list[tuple[dict, str]], alpha: float) -> None:
    """Holm's step-down correction over every (entry, p-value key) of a table: adds `*_p_holm` and
    `*_supported` to each entry."""
    order = sorted(range(len(tests)), key=lambda i: tests[i][0][tests[i][1]])
    running, n = 0.0, len(tests)
    for rank, i in enumerate(order):
        entry, key = tests[i]
        adjusted = min(1.0, max(running, (n - rank) * entry[key]))
        running = adjusted
        entry[key.replace("_p", "_p_holm")] = adjusted
        entry[key.replace("_p", "_supported")] = adjusted < alpha
