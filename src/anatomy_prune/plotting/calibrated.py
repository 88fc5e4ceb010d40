"""Figures of the calibrated-pruning benchmark (benchmarks/calibrated.py), drawn from its saved JSON."""
from __future__ import annotations

import matplotlib.pyplot as plt

STYLE = {"calibrated": dict(color="tab:red", marker="o", lw=2.2, zorder=5),
         "magnitude+comp": dict(color="tab:orange", marker="s", ls="--"),
         "magnitude": dict(color="tab:orange", marker="s"),
         "random": dict(color="tab:gray", marker="x"),
         "strategy": dict(color="tab:blue", marker="^"),
         "activation": dict(color="tab:green", marker="v")}


def accuracy_vs_sparsity(encoder: dict, title: str | None = None):
    """Accuracy (%) against the fraction of FFN neurons removed, one line per method, the dense accuracy
    and the issue's targets (1 point lost at 50%, 3 at 70%) marked. `encoder`: the JSON's "encoder" part."""
    rows = encoder["rows"]
    dense = 100 * encoder["dense_accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity"], 100 * r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **STYLE.get(method, {}))
    ax.axhline(dense, color="black", lw=0.8, ls=":", label=f"dense {dense:.1f}")
    for s, allowed in ((0.5, 1.0), (0.7, 3.0)):
        ax.plot([s], [dense - allowed], marker="_", color="black", ms=18, mew=2)
    ax.set_xlabel("fraction of FFN neurons removed (no retraining)")
    ax.set_ylabel("accuracy on test reviews (%)")
    ax.set_title(title or f"{encoder['model']}: {encoder['eval_size']} IMDB test reviews")
    ax.set_ylim(max(45, ax.get_ylim()[0]), min(100, dense + 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def perplexity_bars(lm: dict):
    """Perplexity of each method at each sparsity (log scale), dense as a line. `lm`: the JSON's "lm" part."""
    rows = [r for r in lm["rows"] if r["method"] != "dense"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((r["perplexity"] for r in rows if r["method"] == m and r["sparsity"] == s), float("nan"))
                for s in sparsities]
        ax.bar([j + i * width for j in range(len(sparsities))], vals, width, label=m,
               color=STYLE.get(m, {}).get("color"), hatch="//" if m.endswith("+comp") else None)
    ax.axhline(lm["dense_perplexity"], color="black", ls=":", lw=1, label=f"dense {lm['dense_perplexity']:.1f}")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(sparsities))],
                  [f"{s:.0%} removed" for s in sparsities])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity on held-out IMDB text (log)")
    ax.set_title(f"{lm['model']}: FFN neurons removed without retraining")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig
