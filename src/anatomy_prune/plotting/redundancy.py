"""Fine-pruning and redundancy figures, drawn from saved results (results.json / redundancy.json), never
from a model. Each `*_figure` function returns the matplotlib Figure (restyle it in a notebook); the `plot_*`
functions save one as PNG and PDF and return the PNG's path.

per_layer_figure:  per layer, what each method leaves behind: kept neurons, sensitivity (sum over the layer's
                   neurons) and the unique fraction (the second paper's analysis, per layer)
training_figure:   the runs' schedules: training loss (smoothed) and kept fraction against the step
methods_figure:    perplexity (or accuracy) per method with its interval, beside the references a reader needs:
                   the dense model, each method's one-shot value (pruned, not trained) and, for a language
                   model, the uniform guess over the vocabulary (perplexity = vocabulary size)
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt

from . import save

COLORS = {"dense": "black", "random": "tab:gray", "magnitude": "tab:orange", "movement": "tab:blue",
          "gum": "tab:red"}
NAMES = {"gum": "GUM (global movement + uniqueness)", "movement": "movement (local)", "magnitude": "magnitude",
         "random": "random"}


def _color(name: str):
    return COLORS.get(name.split()[0], None)


def per_layer_figure(runs: Mapping[str, dict], model: str = "") -> plt.Figure:
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
    axes[2].set_ylabel("unique neurons (%)\n(no later neuron with activation cosine >= 0.8)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model + ': ' if model else ''}what each method leaves behind, per layer")
    fig.tight_layout()
    return fig


def plot_per_layer(runs: Mapping[str, dict], folder: str | Path, name: str = "redundancy_per_layer") -> Path:
    return save(per_layer_figure(runs), folder, name)


def _smooth(values: Sequence[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def training_figure(runs: Mapping[str, dict], model: str = "", k: int = 5) -> plt.Figure:
    """Training loss (mean of the last `k` steps) per run, and the kept fraction of the cubic schedule."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    for label, r in runs.items():
        h = r["history"]
        ax.plot(h["step"], _smooth(h["loss"], k), color=_color(label), label=NAMES.get(label, label))
    first = next(iter(runs.values()))["history"]
    ax2.plot(first["step"], [100 * v for v in first["keep"]], color="black")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of the last {k} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("FFN neurons kept (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("the cubic schedule (all methods)", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{model + ': ' if model else ''}training loss while pruning", fontsize=10)
    fig.tight_layout()
    return fig


def plot_training(results: dict, folder: str | Path, name: str = "training") -> Path:
    """One run's training figure, saved."""
    return save(training_figure({results["method"]: results}, results["model"]), folder, name)


def methods_figure(rows: Sequence[dict], dense: dict | None = None, vocab_size: int | None = None,
                   model: str = "") -> plt.Figure:
    """One point per method: `rows` of {label, value, low, high, one_shot (optional)}; the metric is perplexity
    (log scale) unless rows carry metric="accuracy". `dense`: {value, low, high}; `vocab_size`: the uniform
    guess's perplexity, drawn as a line (a model above it predicts worse than not knowing the language)."""
    metric = rows[0].get("metric", "perplexity")
    fig, ax = plt.subplots(figsize=(7, 4))
    x = list(range(len(rows)))
    for i, r in enumerate(rows):
        yerr = [[r["value"] - r["low"]], [r["high"] - r["value"]]] if r.get("low") is not None else None
        ax.errorbar([i], [r["value"]], yerr=yerr, fmt="o", capsize=4, markersize=7, color=_color(r["label"]),
                    label="fine-pruned (95% interval)" if i == 0 else None)
        if r.get("one_shot") is not None:
            ax.scatter([i], [r["one_shot"]], marker="v", color=_color(r["label"]), s=50, alpha=0.6,
                       label="pruned at once, not trained" if i == 0 else None)
    if dense is not None:
        ax.axhline(dense["value"], color="black", linestyle="--", linewidth=1,
                   label=f"dense: {dense['value']:.3g}" + (f" [{dense['low']:.3g}-{dense['high']:.3g}]"
                                                          if dense.get("low") is not None else ""))
    if vocab_size and metric == "perplexity":
        ax.axhline(vocab_size, color="tab:purple", linestyle=":", linewidth=1.2,
                   label=f"uniform guess over {vocab_size:,} tokens")
    ax.set_xticks(x, [NAMES.get(r["label"], r["label"]).replace(" (", "\n(") for r in rows], fontsize=8)
    if metric == "perplexity":
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    else:
        ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{model + ': ' if model else ''}the second paper's four methods", fontsize=10)
    fig.tight_layout()
    return fig


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
    else:
        axes[0].set_yscale("log")
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
