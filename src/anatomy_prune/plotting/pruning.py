"""Pruning figures, drawn from a sweep's rows (results.json), never from a model.

metric_vs_sparsity:  the paper's Figures 4 / 5 (accuracy, or perplexity for a causal LM, against sparsity)
latency_vs_sparsity: Figures 4-1 / 5-1 (time for the evaluation texts against sparsity)
neurons_per_layer:   Figure 4a (neurons pruned in each layer, per method and sparsity)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from . import save

MARKERS = {"random": "o", "magnitude": "s", "strategy": "^", "activation": "D", "calibrated": "*"}


def _metric(rows: Sequence[dict]) -> str:
    return "accuracy" if "accuracy" in rows[0] else "perplexity"


def _series(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows by method (config rows, which carry a label, as '<method> (config)'), sorted by sparsity, each
    line starting from the dense baseline; the seeds of a point are averaged (their spread kept in `_seeds`)."""
    dense = [r for r in rows if r["method"] == "dense"]
    out: dict[str, dict] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        name = r["method"] + (" (config)" if r.get("label") else "")
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


def metric_vs_sparsity(rows: Sequence[dict], folder: str | Path, reference: dict | None = None,
                       name: str = "accuracy_vs_sparsity") -> Path:
    """Accuracy (%) or perplexity against the fraction of FFN neurons removed, one line per method; for a
    classifier a second panel shows points lost against the dense model, with the paper's points beside."""
    metric = _metric(rows)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    series = _series(rows)
    two = metric == "accuracy" and dense is not None
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4), squeeze=False)
    ax = axes[0][0]
    scale = 100 if metric == "accuracy" else 1
    for label, rs in series.items():
        style = dict(marker=MARKERS.get(label.split()[0], "."), label=label)
        if label.endswith("(config)"):
            style.update(linestyle="none")
        xs = [100 * r["sparsity"] for r in rs]
        ax.errorbar(xs, [scale * r[metric] for r in rs], yerr=_yerr(rs, metric, scale), capsize=2, **style)
        if two:
            axes[0][1].errorbar(xs, [scale * (r[metric] - dense[metric]) for r in rs],
                                yerr=_yerr(rs, metric, scale, dense[metric]), capsize=2, **style)
    if reference and metric == "accuracy":
        for i, p in enumerate(reference["points"]):
            kw = dict(marker="x", color="black", s=60, zorder=5, label=reference["label"] if i == 0 else None)
            ax.scatter(100 * p["sparsity"], 100 * p["accuracy"], **kw)
            if two:
                axes[0][1].scatter(100 * p["sparsity"], 100 * (p["accuracy"] - reference["dense"]), **kw)
            ax.annotate(p["method"], (100 * p["sparsity"], 100 * p["accuracy"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        ax.axhline(100 * reference["dense"], color="black", linestyle=":", linewidth=0.8)
    if metric == "accuracy":
        ax.axhline(50, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("accuracy (%)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    ax.set_xlabel("FFN neurons removed (%)")
    ax.set_title(f"{metric.capitalize()} after pruning ({rows[-1]['mode']} mode, n={rows[0]['n_eval']})\n"
                 "bars: 95% interval of one evaluation, or min-max over seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if two:
        a2 = axes[0][1]
        a2.axhline(0, color="grey", linewidth=0.8)
        a2.set_xlabel("FFN neurons removed (%)")
        a2.set_ylabel("accuracy change vs dense (points)")
        a2.set_title("Points lost, ours and the paper's")
        a2.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, folder, name)


def latency_vs_sparsity(rows: Sequence[dict], folder: str | Path, name: str = "latency_vs_sparsity") -> Path:
    """Wall-clock time for the evaluation texts against sparsity, one line per method, dense dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for label, rs in _series(rows).items():
        style = dict(marker=MARKERS.get(label.split()[0], "."), label=label)
        if label.endswith("(config)"):
            style.update(linestyle="none")
        ax.plot([100 * r["sparsity"] for r in rs], [r["latency_s"] for r in rs], **style)
    if dense:
        ax.axhline(dense["latency_s"], color="black", linestyle="--", linewidth=0.8, label="dense")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("FFN neurons removed (%)")
    ax.set_ylabel(f"time for {rows[0]['n_eval']} texts (s)")
    ax.set_title(f"Inference time ({rows[-1]['mode']} mode, {rows[0].get('device', '?')})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, folder, name)


def neurons_per_layer(rows: Sequence[dict], folder: str | Path, name: str = "neurons_per_layer") -> Path:
    """Neurons removed in each layer: one panel per method, one line per sparsity (the paper's Figure 4a)."""
    series = {k: [r for r in v if r["method"] != "dense"] for k, v in _series(rows).items()}
    series = {k: v for k, v in series.items() if v}
    n = max(1, len(series))
    cols = min(n, 3)
    rws = (n + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(4.2 * cols, 3.2 * rws), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (label, rs) in zip(axes.flat, series.items()):
        for i, r in enumerate(rs):
            per = r["neurons_removed_per_layer"]
            tag = r.get("label") or f"{100 * r['sparsity']:.0f}%"
            ax.plot(range(len(per)), per, marker=".", color=cmap(i / max(1, len(rs) - 1)), label=tag)
        ax.set_title(label)
        ax.set_xlabel("layer (block)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(rs) > 5 else 1)
    for ax in axes[:, 0]:
        ax.set_ylabel("neurons removed")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle("FFN neurons removed per layer")
    fig.tight_layout()
    return save(fig, folder, name)
