"""Figures of the latency benchmark (benchmarks/latency.py, pipeline.latency): measured speedup against the
FLOP bound. `plot_speedups` returns the Figure; `plot_speedup` saves it (the benchmark's figure files).

Variants, as the legend names them: mask = the neurons' weights zeroed, matrices kept their size (the
paper's way); physical = the neurons removed, matrices sliced; physical-xK = physical with each layer's kept
width rounded to a multiple of K (GEMM-friendly shapes); physical-strided = physical with its weights stored
column-major (a control for memory layout)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from . import save

_STYLE = {"physical": dict(color="C0", marker="o"), "mask": dict(color="C3", marker="s"),
          "physical-strided": dict(color="C7", marker="x", linestyle=":")}
_EXTRA = ("C2", "C1", "C4", "C5", "C6", "C8", "C9")  # physical-xK variants


def variant_label(v: str) -> str:
    """The legend's words for a benchmark variant (every abbreviation spelt out)."""
    if v.startswith("physical-x"):
        return f"physical, widths rounded to multiples of {v[len('physical-x'):]}"
    return {"mask": "masked (weights zeroed, the paper's way)", "physical": "physical (neurons removed)",
            "physical-strided": "physical, column-major weights (control)"}.get(v, v)


def plot_speedup(result: dict, folder: str | Path, device: str = "cpu", name: str | None = None) -> Path:
    """plot_speedups, saved as `folder/name`.png and .pdf."""
    return save(plot_speedups(result, device), folder, name or f"speedup_{device}")


def plot_speedups(result: dict, device: str = "cpu", model: str = ""):
    """Speedup over the dense model vs FFN sparsity, one panel per (batch size, length): the FLOP bound
    (dashed), physically pruned and masked models measured (bars: quartiles of the round-by-round ratios).

    `result` is the benchmark's JSON (its "results" list, or one latency_sweep result with "rows").
    """
    rows = [r for res in result.get("results", [result]) for r in res["rows"] if r["device"] == device]
    if not rows:
        raise ValueError(f"no {device} rows to plot")
    shapes = sorted({(r["batch_size"], r["seq_len"]) for r in rows}, key=lambda x: (x[1], x[0]))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "dense"]
    ncol = min(len(shapes), 4)
    nrow = (len(shapes) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(6.0, 3.6 * ncol + 0.4), 3.4 * nrow), squeeze=False,
                             sharey=True)
    top = 1.0
    for ax, (b, n) in zip(axes.flat, shapes):
        here = [r for r in rows if (r["batch_size"], r["seq_len"]) == (b, n)]
        phys = sorted((r for r in here if r["variant"] == "physical"), key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] for r in phys], [r["ideal_speedup"] for r in phys], "k--", lw=1.2,
                label="ideal (FLOP bound)")
        for k, v in enumerate(variants):
            pts = sorted((r for r in here if r["variant"] == v), key=lambda r: r["sparsity"])
            if not pts:
                continue
            x = [r["sparsity"] for r in pts]
            y = [r["speedup"] for r in pts]
            err = [[max(0.0, r["speedup"] - r["paired_q1"]) for r in pts],
                   [max(0.0, r["paired_q3"] - r["speedup"]) for r in pts]]
            style = _STYLE.get(v, dict(color=_EXTRA[k % len(_EXTRA)], marker="^"))
            ax.errorbar(x, y, yerr=err, capsize=2, ms=4, lw=1.2, label=variant_label(v), **style)
            top = max(top, max(y))  # noisy quartiles may run off the top; the medians set the scale
        top = max(top, max((r["ideal_speedup"] for r in phys), default=1.0))
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(f"batch {b}, length {n}", fontsize=10)
        ax.set_xlabel("FFN sparsity (fraction of neurons removed)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over dense (x)")
    axes[0, 0].set_ylim(0.0, top * 1.2)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 2))
    model = model or result.get("settings", {}).get("model", "")
    fig.suptitle(f"{model} on {device}: speedup over dense, timed interleaved\n(bars: quartiles of the "
                 "round-by-round ratios)".strip(), fontsize=10)
    fig.tight_layout()
    return fig
