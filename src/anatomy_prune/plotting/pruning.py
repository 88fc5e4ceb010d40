"""Pruning figures, drawn from a sweep's rows (results.json), never from a model. The `plot_*` functions
return the matplotlib Figure (a notebook restyles or shows it); the older names save it into a folder (the
sweep's figures/, the CLI).

plot_metric / metric_vs_sparsity:     the paper's Figures 4 / 5 (accuracy, or perplexity, against sparsity)
plot_latency / latency_vs_sparsity:   Figures 4-1 / 5-1 (one reading of the evaluation time per point)
plot_neurons / neurons_per_layer:     Figure 4a (neurons pruned in each layer, per method and sparsity)

Config rows (a TOML grid: the paper's Figure 5a, the strategy ablation) form one series per label, each in
its own colour, so the variants can be told apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from . import save

MARKERS = {"random": "o", "magnitude": "s", "strategy": "^", "activation": "D", "calibrated": "*"}
COLORS = {"random": "C0", "magnitude": "C1", "strategy": "C2", "activation": "C3", "calibrated": "C4"}
EXTRA_COLORS = ("C6", "C9", "C7", "C8", "C5", "navy", "maroon", "darkorange", "teal")  # config series


def _style(label: str, k: int) -> dict:
    """Marker and colour of a series: fixed per method; config series (`method: label`) by their order."""
    method = label.split(":")[0].split()[0]
    if ":" in label:
        return dict(marker=MARKERS.get(method, "."), color=EXTRA_COLORS[k % len(EXTRA_COLORS)], label=label)
    return dict(marker=MARKERS.get(method, "."), color=COLORS.get(method, "k"), label=label)


def _metric(rows: Sequence[dict]) -> str:
    return "accuracy" if "accuracy" in rows[0] else "perplexity"


def _series(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows by method (config rows, which carry a label, as '<method>: <label>'), sorted by sparsity, each
    line starting from the dense baseline; the seeds of a point are averaged (their spread kept in `_seeds`)."""
    dense = [r for r in rows if r["method"] == "dense"]
    out: dict[str, dict] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        name = r["method"] + (f": {r['label']}" if r.get("label") else "")
        key = (r.get("target_sparsity"), r.get("label"), r["sparsity"] if r.get("target_sparsity") is None else None)
        out.setdefault(name, {}).setdefault(key, []).append(r)
    series = {}
    for name, points in out.items():
        merged = []
        for rs in points.values():
            if len(rs) == 1:
                merged.append(rs[0])
                continue
            m = dict(rs[0])
            for k in ("accuracy", "perplexity", "latency_s", "sparsity"):
                if k in m:
                    m[k] = sum(r[k] for r in rs) / len(rs)
            m["_seeds"] = rs
            merged.append(m)
        series[name] = sorted(dense + merged, key=lambda r: r["sparsity"])
    return series


def _yerr(rs: Sequence[dict], metric: str, scale: float, shift: float = 0.0):
    """Error bars: the 95% interval of a single evaluation, or the min-max over seeds."""
    lo, hi = [], []
    for r in rs:
        v = scale * (r[metric] - shift)
        if r.get("_seeds"):
            vals = [scale * (s[metric] - shift) for s in r["_seeds"]]
            lo.append(v - min(vals))
            hi.append(max(vals) - v)
        elif r.get("accuracy_interval") and metric == "accuracy":
            lo.append(v - scale * (r["accuracy_interval"][0] - shift))
            hi.append(scale * (r["accuracy_interval"][1] - shift) - v)
        else:
            lo.append(0.0)
            hi.append(0.0)
    return [lo, hi]


def plot_metric(rows: Sequence[dict], reference: dict | None = None, model: str = "",
                dense_label: str = "dense") -> plt.Figure:
    """Accuracy (%) or perplexity against the fraction of FFN neurons removed, one line per method (config
    rows: one series per label); for a classifier a second panel shows points lost against the dense model,
    with the paper's points beside (`reference`: {"label", "dense", "points": [{method, sparsity, accuracy}]})."""
    metric = _metric(rows)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    series = _series(rows)
    two = metric == "accuracy" and dense is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    scale = 100 if metric == "accuracy" else 1
    for k, (label, rs) in enumerate(series.items()):
        style = _style(label, k)
        if ":" in label and len(rs) <= 2:  # one config point: no line from the dense model, no dense marker
            style.update(linestyle="none")
            rs = [r for r in rs if r["method"] != "dense"]
        xs = [100 * r["sparsity"] for r in rs]
        ax.errorbar(xs, [scale * r[metric] for r in rs], yerr=_yerr(rs, metric, scale), capsize=2, **style)
        if two:
            axes[0][1].errorbar(xs, [scale * (r[metric] - dense[metric]) for r in rs],
                                yerr=_yerr(rs, metric, scale, dense[metric]), capsize=2, **style)
    if dense is not None:
        ax.axhline(scale * dense[metric], color="C7", linestyle="--", linewidth=0.8,
                   label=f"{dense_label}: {scale * dense[metric]:.1f}" if metric == "accuracy" else dense_label)
    if reference and metric == "accuracy":
        for i, p in enumerate(reference["points"]):
            kw = dict(marker="x", color="black", s=60, zorder=5, label=reference["label"] if i == 0 else None)
            ax.scatter(100 * p["sparsity"], 100 * p["accuracy"], **kw)
            if two and reference.get("dense") is not None:
                axes[0][1].scatter(100 * p["sparsity"], 100 * (p["accuracy"] - reference["dense"]), **kw)
            ax.annotate(p["method"], (100 * p["sparsity"], 100 * p["accuracy"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        if reference.get("dense") is not None:  # a paper may quote pruned points only (GPT-2's)
            ax.axhline(100 * reference["dense"], color="black", linestyle=":", linewidth=0.8,
                       label=f"{reference['label']}: dense")
    if metric == "accuracy":
        ax.axhline(50, color="grey", linestyle="-.", linewidth=0.8, label="chance: 50")
        ax.set_ylabel("accuracy (%)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    ax.set_xlabel("FFN neurons removed (%)")
    ax.set_title(f"{model + ': ' if model else ''}{metric} after pruning ({rows[-1]['mode']}, "
                 f"n={rows[0]['n_eval']})\nbars: 95% interval of one evaluation, or min-max over seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if two:
        a2 = axes[0][1]
        a2.axhline(0, color="grey", linewidth=0.8)
        a2.set_xlabel("FFN neurons removed (%)")
        a2.set_ylabel("accuracy change vs dense (points)")
        a2.set_title("Points lost against each model's own dense accuracy", fontsize=9)
        a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metric_vs_sparsity(rows: Sequence[dict], folder: str | Path, reference: dict | None = None,
                       name: str = "accuracy_vs_sparsity", model: str = "") -> Path:
    """plot_metric, saved as `folder/name`.png and .pdf."""
    return save(plot_metric(rows, reference, model), folder, name)


def plot_latency(rows: Sequence[dict], model: str = "") -> plt.Figure:
    """Wall-clock time for the evaluation texts against sparsity, one line per method, dense dashed. One
    reading per point, not interleaved: for speedups use the latency benchmark (plotting.latency)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for k, (label, rs) in enumerate(_series(rows).items()):
        style = _style(label, k)
        if ":" in label and len(rs) <= 2:
            style.update(linestyle="none")
        ax.plot([100 * r["sparsity"] for r in rs], [r["latency_s"] for r in rs], **style)
    if dense:
        ax.axhline(dense["latency_s"], color="black", linestyle="--", linewidth=0.8, label="dense")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("FFN neurons removed (%)")
    ax.set_ylabel(f"time for {rows[0]['n_eval']} texts (s)")
    ax.set_title(f"{model + ': ' if model else ''}evaluation time ({rows[-1]['mode']}, {rows[0].get('device', '?')})"
                 "\none reading per point (not interleaved with dense)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def latency_vs_sparsity(rows: Sequence[dict], folder: str | Path, name: str = "latency_vs_sparsity",
                        model: str = "") -> Path:
    """plot_latency, saved as `folder/name`.png and .pdf."""
    return save(plot_latency(rows, model), folder, name)


def plot_neurons(rows: Sequence[dict], model: str = "", widths: Sequence[int] | None = None) -> plt.Figure:
    """Neurons removed in each layer: one panel per method (config rows together in one panel, one line per
    label), one line per sparsity (the paper's Figure 4a). `widths`: each layer's d_ff, drawn as the ceiling."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for r in rows:
        if r["method"] == "dense" or "neurons_removed_per_layer" not in r:
            continue
        panel = r["method"] + (" (config rows)" if r.get("label") else "")
        tag = r.get("label") or f"{100 * r['sparsity']:.0f}%"
        groups.setdefault(panel, [])
        if tag not in [t for t, _ in groups[panel]]:  # one seed of a random point is enough to show its shape
            groups[panel].append((tag, r))
    n = max(1, len(groups))
    cols = min(n, 3)
    rws = (n + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(4.4 * cols, 3.4 * rws), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (panel, lines) in zip(axes.flat, groups.items()):
        config = panel.endswith("(config rows)")
        for i, (tag, r) in enumerate(sorted(lines, key=lambda t: (t[1]["sparsity"], t[0]))):
            per = r["neurons_removed_per_layer"]
            color = EXTRA_COLORS[i % len(EXTRA_COLORS)] if config else cmap(i / max(1, len(lines) - 1))
            ax.plot(range(len(per)), per, marker=".", color=color,
                    label=f"{tag} ({100 * r['sparsity']:.0f}%)" if config else tag)
        if widths:
            ax.plot(range(len(widths)), widths, color="0.6", ls=":", lw=1, label="all neurons (d_ff)")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("layer (block)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(lines) > 5 and not config else 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("neurons removed")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"{model + ': ' if model else ''}FFN neurons removed per layer", fontsize=10)
    fig.tight_layout()
    return fig


def neurons_per_layer(rows: Sequence[dict], folder: str | Path, name: str = "neurons_per_layer",
                      model: str = "") -> Path:
    """plot_neurons, saved as `folder/name`.png and .pdf."""
    return save(plot_neurons(rows, model), folder, name)


def plot_removed_by_depth(ours: dict[str, Sequence[int]], widths: Sequence[int],
                          paper: dict[str, Sequence[int]] | None = None, paper_width: int = 3072,
                          model: str = "", paper_model: str = "BERT-base") -> plt.Figure:
    """Figure 4a across depths: the share of each block's FFN neurons a rule removes, ours (one line per
    setting) beside the paper's (12 blocks of `paper_width`), block i of n drawn at depth (i + 0.5) / n so
    that models of different depths line up."""
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(widths)
    for k, (label, removed) in enumerate(ours.items()):
        ax.plot([(i + 0.5) / n for i in range(n)], [100 * r / w for r, w in zip(removed, widths)], marker="o",
                color=EXTRA_COLORS[k % len(EXTRA_COLORS)], label=f"{model or 'ours'}: {label}")
    for label, removed in (paper or {}).items():
        m = len(removed)
        ax.plot([(i + 0.5) / m for i in range(m)], [100 * r / paper_width for r in removed], marker="x",
                color="black", ls="--", label=f"paper, {paper_model}: {label}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("relative depth of the block (block i of n at (i + 0.5) / n)")
    ax.set_ylabel("FFN neurons the rule removes (%)")
    ax.set_title(f"{model + ': ' if model else ''}neurons removed per block by the threshold rule", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
