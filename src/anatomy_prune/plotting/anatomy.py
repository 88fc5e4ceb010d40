"""Anatomy figures (the first paper's Figures 1, 1a, 2, 3 and the randomness measures), each from saved
results: the dicts of layer_similarity.json / summary.json, the GraphML graph, Jaccard matrices. Each
function returns the matplotlib Figure it drew (restyle it, or `save` it); titles name the model."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.patches import Polygon

from . import model_label

MAX_LEGEND = 12          # more inputs than this: thin lines without a legend, plus the mean
MAX_DRAWN_EDGES = 400    # more edges than this between two layers: one band instead of single lines
MAX_LABELS = 12          # label neuron ids when a layer has at most this many nodes
PAPER_SHARE = 0.05       # the paper: under 5% of a layer's neurons are above the threshold


def _curve_panel(ax, sim: np.ndarray, names: Sequence[str], title: str) -> None:
    n, width = sim.shape
    x = np.arange(width)
    if n <= MAX_LEGEND:
        for k in range(n):
            ax.plot(x, sim[k], marker="o", ms=3, lw=1.3, label=names[k])
    else:
        ax.plot(x, sim.T, color="0.6", lw=0.5, alpha=min(1.0, 20 / n))
        ax.plot(x, sim.mean(axis=0), color="C3", lw=2, label=f"mean of {n} inputs")
        ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_xticks(x if width <= 16 else x[::max(1, width // 15)])
    ax.set_ylim(min(-0.1, float(np.nanmin(sim)) - 0.05), 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _name(doc: dict) -> str:
    """The model's display name from a saved document (never its run path)."""
    return model_label(doc.get("model", "?"), doc.get("base_model"), doc.get("kind"))


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def plot_layer_similarity(layer_doc: dict):
    """Figure 1 / 1a: cosine of each layer's readout token with the last layer's, one line per input.
    Decoders get a second panel with the last block's state before the final norm as the target."""
    sim = np.asarray(layer_doc["similarity"], dtype=float)  # [n, L+1]
    names = layer_doc.get("names") or [f"input {i}" for i in range(len(sim))]
    pre = layer_doc.get("prenorm_similarity")
    panels = 2 if pre is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    token = "CLS" if layer_doc.get("readout") == "cls" else "last token"
    _curve_panel(axes[0, 0], sim, names, f"{_name(layer_doc)}: {token} state vs the last layer's")
    axes[0, 0].set_ylabel("cosine similarity")
    if pre is not None:
        _curve_panel(axes[0, 1], np.asarray(pre, dtype=float), names,
                     f"target: last block before the final norm ({layer_doc.get('final_norm')})")
    fig.tight_layout()
    if len(sim) <= MAX_LEGEND:  # one legend under the panels, so it never hides a curve
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2 if panels > 1 else 1,
                   fontsize=7, frameon=False)
    return fig


def plot_layer_similarity_spread(summary: dict, layer_doc: dict | None = None):
    """Mean, +-1 std and the 10-90% range of the layer similarity over inputs, per layer."""
    st = summary["layer_similarity"]
    mean, std = np.asarray(st["mean"], dtype=float), np.asarray(st["std"], dtype=float)
    x = np.arange(len(mean))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.fill_between(x, st["q10"], st["q90"], color="C0", alpha=0.15, label="10-90% of inputs")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.3, label="mean +- std")
    ax.plot(x, mean, color="C0", lw=2, marker="o", ms=3, label="mean")
    ax.plot(x, st["min"], color="C0", lw=0.8, ls=":", label="min / max")
    ax.plot(x, st["max"], color="C0", lw=0.8, ls=":")
    pre = summary.get("prenorm_layer_similarity")
    if pre is not None:
        ax.plot(x, pre["mean"], color="C1", lw=1.5, ls="--", label="mean, target before final norm")
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine similarity with the last layer")
    ax.set_xticks(x if len(x) <= 16 else x[::max(1, len(x) // 15)])
    ax.set_title(f"{(layer_doc and _name(layer_doc)) or _name(summary)}: layer similarity over "
                 f"{summary['n_inputs']} inputs", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _node_positions(per_layer: dict, shown: list[int], row: dict[int, int]) -> dict[str, tuple[float, float]]:
    """Each shown layer's nodes spread across its row, centred (narrower for few nodes)."""
    pos: dict[str, tuple[float, float]] = {}
    for layer in shown:
        nodes = per_layer[layer]
        k = len(nodes)
        xs = np.linspace(0.5 - 0.45 * min(1, k / 12), 0.5 + 0.45 * min(1, k / 12), k) if k > 1 else [0.5] * k
        for node, x in zip(nodes, xs):
            pos[node] = (float(x), -float(row[layer]))
    return pos


def _draw_edges(ax, per_layer: dict, shown: list[int], row: dict[int, int], pos: dict) -> None:
    """Edges between consecutive layers: drawn one by one, or as one band with their count when dense."""
    for layer in shown:
        a, b = per_layer[layer], per_layer.get(layer + 1, [])
        if not b:
            continue
        ya, yb = -row[layer], -row[layer + 1]
        if len(a) * len(b) <= MAX_DRAWN_EDGES:
            segs = [(pos[u], pos[v]) for u in a for v in b]
            ax.add_collection(LineCollection(segs, colors="0.55", linewidths=0.5,
                                             alpha=max(0.08, min(0.6, 30 / len(segs)))))
        else:
            xa = [pos[u][0] for u in a]
            xb = [pos[v][0] for v in b]
            ax.add_patch(Polygon([(min(xa), ya), (max(xa), ya), (max(xb), yb), (min(xb), yb)], closed=True,
                                 color="0.75", alpha=0.35, lw=0))
            ax.text(0.985, (ya + yb) / 2, f"{len(a)}x{len(b)} edges", fontsize=6, ha="right", va="center",
                    color="0.35", transform=ax.get_yaxis_transform())


def _draw_nodes(ax, g, per_layer: dict, shown: list[int], pos: dict, cmap) -> None:
    """Nodes coloured by the share of inputs they are above the threshold for; ids when a layer has few."""
    for layer in shown:
        nodes = per_layer[layer]
        frac = [float(g.nodes[u].get("fraction_inputs", 1.0)) for u in nodes]
        xy = np.array([pos[u] for u in nodes])
        size = 40 if len(nodes) <= 40 else max(4, 1600 / len(nodes))
        ax.scatter(xy[:, 0], xy[:, 1], c=frac, cmap=cmap, vmin=0, vmax=1, s=size, zorder=3,
                   edgecolors="k", linewidths=0.3 if len(nodes) <= 40 else 0)
        if len(nodes) <= MAX_LABELS:
            for u, (x, y) in zip(nodes, xy):
                ax.annotate(str(g.nodes[u]["neuron"]), (x, y), xytext=(0, 5), textcoords="offset points",
                            fontsize=6, ha="center")


def plot_neuron_graph(g, title: str = ""):
    """Figures 2 / 3: above-threshold neurons laid out by layer (first layer on top), edges between
    consecutive layers. Only layers with a neuron get a row; the empty ones are named under the title. Dense
    gaps are drawn as one band with the edge count; colour = share of inputs for which the neuron is above
    the threshold; ids are written when a layer has few nodes."""
    from ..anatomy.graphs import layers_of

    per_layer = layers_of(g)
    shown = [layer for layer, nodes in per_layer.items() if nodes]
    empty = [layer for layer, nodes in per_layer.items() if not nodes]
    row = {layer: r for r, layer in enumerate(shown)}
    n_rows = max(1, len(shown))
    fig, ax = plt.subplots(figsize=(10, max(2.8, min(0.42 * n_rows, 0.26 * n_rows + 2.5) + 1.2)))
    pos = _node_positions(per_layer, shown, row)
    cmap = plt.get_cmap("viridis")
    _draw_edges(ax, per_layer, shown, row, pos)
    _draw_nodes(ax, g, per_layer, shown, pos, cmap)
    ax.set_yticks([-r for r in range(len(shown))])
    ax.set_yticklabels([f"layer {i} ({len(per_layer[i])})" for i in shown], fontsize=7)
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.set_ylim(-n_rows + 0.5, 0.6)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    n_inputs = int(g.graph.get("n_inputs", 1))
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01).set_label(f"share of the {n_inputs} inputs", fontsize=8)
    note = f"\nno neuron above the threshold in layer(s) {_ranges(empty)}" if empty else ""
    if not shown:
        ax.text(0.5, 0, "no neuron above the threshold in any layer", ha="center", va="center")
    ax.set_title((title + f" ({g.number_of_nodes()} nodes)" if title else f"{g.number_of_nodes()} nodes") + note,
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_jaccard(mats: Sequence[np.ndarray], names: Sequence[str] | None = None, title: str = ""):
    """Pairwise Jaccard overlap of the inputs' neuron sets, one heatmap per layer that has a neuron above
    the threshold for some input (the empty layers are named in the title; grey cell: both sets empty)."""
    layers = [i for i, m in enumerate(mats) if np.isfinite(np.asarray(m, dtype=float)).any()]
    empty = [i for i in range(len(mats)) if i not in layers]
    n = len(mats[0]) if len(mats) else 0
    cols = min(6, max(1, len(layers)))
    rows = max(1, int(np.ceil(len(layers) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols + 0.9, 2.15 * rows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("magma").with_extremes(bad="0.85")
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(layers):
            ax.axis("off")
            continue
        i = layers[k]
        m = np.asarray(mats[i], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        off = m[np.triu_indices(len(m), k=1)]
        off = off[np.isfinite(off)]
        ax.set_title(f"layer {i}: " + (f"mean {off.mean():.2f}" if off.size else "one input only"), fontsize=7)
        first_col, last_row = k % cols == 0, k // cols == rows - 1 or k + cols >= len(layers)
        ticks = list(range(n)) if n <= 12 else []
        ax.set_xticks(ticks if last_row else [])
        ax.set_yticks(ticks if first_col else [])
        ax.tick_params(labelsize=5, length=1.5)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.025, pad=0.01, shrink=0.8).set_label("Jaccard", fontsize=8)
    note = f"\nlayer(s) {_ranges(empty)}: no neuron above the threshold for any input (not drawn)" if empty else ""
    if not layers:
        axes[0, 0].text(0.5, 0.5, "no neuron above the threshold", ha="center", va="center")
    fig.suptitle(f"{title}: overlap of the {n} inputs' neuron sets (input x input; grey: both empty){note}",
                 fontsize=9)
    return fig


def plot_fraction_above(summary: dict, model: str | None = None):
    """Randomness: share of each layer's neurons above the threshold (%, axis scaled to the data; the
    paper's "under 5%" drawn when it falls in range, else stated) and the mean pairwise Jaccard of the
    inputs' sets, with their spread over inputs / pairs."""
    nr = summary["neurons"]
    frac = {k: 100 * np.asarray(v, dtype=float) for k, v in nr["fraction_above"].items()}
    x = np.arange(len(frac["mean"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.fill_between(x, frac["min"], frac["max"], color="C0", alpha=0.15, label="min-max over inputs")
    a1.fill_between(x, frac["q10"], frac["q90"], color="C0", alpha=0.3, label="10-90%")
    a1.plot(x, frac["mean"], color="C0", marker="o", ms=3, lw=1.8, label="mean")
    top = max(float(np.nanmax(frac["max"])) if len(x) else 0.0, 1e-3) * 1.15
    if 100 * PAPER_SHARE <= top * 1.5:
        a1.axhline(100 * PAPER_SHARE, color="C3", ls="--", lw=1, label="paper: under 5%")
        top = max(top, 100 * PAPER_SHARE * 1.1)
    else:
        a1.text(0.98, 0.95, f"the paper's bound (5%) is off this scale:\nat most {np.nanmax(frac['max']):.2g}% here",
                transform=a1.transAxes, ha="right", va="top", fontsize=7, color="C3")
    a1.set_ylim(0, top)
    a1.set_xlabel("FFN layer")
    a1.set_ylabel(f"neurons with similarity > {summary['threshold']:g} (%)")
    a1.legend(fontsize=7, frameon=False, loc="upper left")
    a1.grid(alpha=0.3)
    jac = nr["jaccard"]
    mean = np.array([np.nan if v is None else v for v in jac["mean"]], dtype=float)
    lo = np.array([np.nan if v is None else v for v in jac["q10"]], dtype=float)
    hi = np.array([np.nan if v is None else v for v in jac["q90"]], dtype=float)
    a2.fill_between(x, lo, hi, color="C2", alpha=0.25, label="10-90% of pairs")
    a2.plot(x, mean, color="C2", marker="o", ms=3, lw=1.8, label="mean pairwise Jaccard")
    a2.set_ylim(-0.02, 1.02)
    a2.set_xlabel("FFN layer")
    a2.set_ylabel("Jaccard overlap of the inputs' sets")
    a2.legend(fontsize=7, frameon=False)
    a2.grid(alpha=0.3)
    for ax in (a1, a2):
        ax.set_xticks(x if len(x) <= 16 else x[::max(1, len(x) // 15)])
    fig.suptitle(f"{model or _name(summary)}: {summary['n_inputs']} inputs, threshold {summary['threshold']:g}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def draw_all(layer_doc: dict, neurons_doc: dict, summary: dict, graph, folder) -> list:
    """Every anatomy figure from the saved documents (no model): PNG + PDF in `folder`."""
    from ..anatomy.measures import jaccard_matrices
    from . import save

    mats = jaccard_matrices(neurons_doc["neurons"])
    name = _name(layer_doc)
    figs = [
        ("layer_similarity", plot_layer_similarity(layer_doc)),
        ("layer_similarity_spread", plot_layer_similarity_spread(summary, layer_doc)),
        ("neuron_graph", plot_neuron_graph(graph, title=f"{name}: neurons with similarity > "
                                                       f"{neurons_doc['threshold']:g}")),
        ("jaccard", plot_jaccard(mats, neurons_doc["names"], title=name)),
        ("fraction_above", plot_fraction_above(summary, model=name)),
    ]
    return [save(fig, folder, name) for name, fig in figs]
