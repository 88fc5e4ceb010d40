"""Fine-pruning and redundancy figures, drawn from saved results (results.json / redundancy.json), never
from a model.

plot_per_layer:  per layer, what each method leaves behind: kept neurons, sensitivity (sum over the layer's
                 neurons) and the unique fraction (the second paper's analysis, per layer)
plot_training:   one run's schedule: kept fraction and training loss against the step
plot_methods:    the benchmark's summary: metric and overall unique fraction / sensitivity per method
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt

from . import save

COLORS = {"dense": "black", "random": "tab:gray", "magnitude": "tab:orange", "movement": "tab:blue",
          "gum": "tab:red"}


def _color(name: str):
    return COLORS.get(name.split()[0], None)


def plot_per_layer(runs: Mapping[str, dict], folder: str | Path, name: str = "redundancy_per_layer") -> Path:
    """`runs`: label -> a results dict with `redundancy` (redundancy.summary) and `kept_widths`."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label, r in runs.items():
        layers = r["redundancy"]["layers"]
        x = [lay["layer"] for lay in layers]
        style = dict(marker="o", markersize=3, label=label, color=_color(label))
        axes[0].plot(x, r.get("kept_widths") or [lay["width"] for lay in layers], **style)
        axes[1].plot(x, [lay["sensitivity_sum"] for lay in layers], **style)
        axes[2].plot(x, [float("nan") if lay["unique_fraction"] is None else 100 * lay["unique_fraction"]
                         for lay in layers], **style)
    axes[0].set_ylabel("FFN neurons kept")
    axes[1].set_ylabel("sensitivity (sum over the layer)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("unique neurons (%)  [no j>i with cos >= 0.8]")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("What each method leaves behind, per layer")
    fig.tight_layout()
    return save(fig, folder, name)


def plot_training(results: dict, folder: str | Path, name: str = "training") -> Path:
    """Kept fraction (the cubic schedule) and training loss against the step, for one run."""
    h = results["history"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(h["step"], h["loss"], color="tab:blue", alpha=0.35, label="loss")
    k = 10
    smooth = [sum(h["loss"][max(0, i - k + 1):i + 1]) / len(h["loss"][max(0, i - k + 1):i + 1])
              for i in range(len(h["loss"]))]
    ax.plot(h["step"], smooth, color="tab:blue", label=f"loss (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("task loss")
    ax2 = ax.twinx()
    ax2.plot(h["step"], [100 * v for v in h["keep"]], color="tab:red", label="neurons kept (%)")
    ax2.set_ylabel("FFN neurons kept (%)", color="tab:red")
    ax2.set_ylim(0, 105)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    ax.set_title(f"{results['method']} ({results['selection']}) on {results['model']}: "
                 f"{results['metric']} {results[results['metric']]:.4g}", fontsize=9)
    fig.tight_layout()
    return save(fig, folder, name)


def plot_methods(rows: list[dict], folder: str | Path, name: str = "finepruning_methods") -> Path:
    """Bars per method: the task metric (dense as a line), the unique fraction and the total sensitivity."""
    metric = rows[0]["metric"]
    labels = [r["label"] for r in rows]
    colors = [_color(lab) for lab in labels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    scale = 100 if metric == "accuracy" else 1
    axes[0].bar(labels, [scale * r[metric] for r in rows], color=colors)
    dense = rows[0].get("dense_" + metric)
    if dense is not None:
        axes[0].axhline(scale * dense, color="black", linestyle="--", label="start (dense)")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel(metric + (" (%)" if metric == "accuracy" else ""))
    if metric == "accuracy":
        lo = min(scale * r[metric] for r in rows + ([{metric: dense}] if dense else []))
        axes[0].set_ylim(max(0, lo - 5), 100)
    axes[1].bar(labels, [100 * r["redundancy"]["unique"] for r in rows], color=colors)
    axes[1].set_ylabel("unique neurons (%)")
    axes[1].set_ylim(max(0, min(100 * r["redundancy"]["unique"] for r in rows) - 3), 100)
    axes[2].bar(labels, [r["redundancy"]["sens_sum"] for r in rows], color=colors)
    axes[2].set_ylabel("sensitivity (sum over neurons)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Fine-pruning at {100 * rows[-1]['target_sparsity']:.0f}% FFN sparsity")
    fig.tight_layout()
    return save(fig, folder, name)
