"""What a notebook shows, and nothing else: labelled tables, markdown rendered from results, figures.

Every output is published as a raw MIME bundle whose plain-text part is readable text (a table, the
markdown itself, a figure's caption), so a committed notebook holds no object reprs such as
`<Figure size ...>` or `<IPython.core.display.Markdown object>`.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any, Sequence


def pct(x: float | None, nd: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.8534 -> '85.3'; None or NaN -> '-'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * float(x):.{nd}f}"


def interval(value: float | None, bounds: Sequence[float] | None = None, nd: int = 1) -> str:
    """A fraction and its interval as percentages: '85.3 [84.3-86.2]' (just '85.3' without bounds)."""
    if not bounds:
        return pct(value, nd)
    return f"{pct(value, nd)} [{pct(bounds[0], nd)}-{pct(bounds[1], nd)}]"


def _cell(v: Any, nd: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{nd}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x, nd) for x in v)
    return str(v).replace("|", "/")


def table_text(rows: Sequence[dict], columns: Sequence[str] | None = None, nd: int = 2) -> tuple[str, str]:
    """(markdown, aligned plain text) of `rows` (dicts) under `columns` (default: the first row's keys)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    cells = [[_cell(r.get(c), nd) for c in columns] for r in rows]
    md = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                   + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    plain = "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
                      for line in [columns] + cells)
    return md, plain


def results_table(rows: Sequence[dict], columns: Sequence[str] | None = None, nd: int = 2) -> None:
    """Display rows as a labelled table (markdown, with an aligned plain-text twin). Format numbers first
    (`interval`, `pct`) where they need units; other floats are rounded to `nd` places."""
    from IPython.display import display

    md_text, plain = table_text(rows, columns, nd)
    display({"text/markdown": md_text, "text/plain": plain}, raw=True)


def md(text: str) -> None:
    """Display markdown (for text rendered from results, so a rerun never leaves a stale claim)."""
    from IPython.display import display

    display({"text/markdown": text, "text/plain": text}, raw=True)


def show(fig, caption: str = "", dpi: int = 90) -> None:
    """Display a matplotlib Figure as a PNG (its caption as the plain-text part) and close it. Restyle the
    figure before calling this: every plotting function returns the Figure it drew."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    title = caption or (fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else "") or \
        next((a.get_title() for a in fig.axes if a.get_title()), "figure")
    display({"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": f"[figure: {title}]"},
            raw=True)


def point_rows(rows: Sequence[dict], label: str = "setting") -> list[dict]:
    """A sweep's rows (results.json) as labelled table rows, one per point: the seeds of a stochastic point
    averaged (their range beside), an accuracy with its 95% interval, the change against the dense model on
    the same texts and McNemar's p (for one seed). Rows that failed are left out."""
    metric = "accuracy" if any("accuracy" in r for r in rows) else "perplexity"
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r.get("label"), r.get("target_sparsity", r["sparsity"])), []).append(r)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out = []
    for (method, lab, _), rs in groups.items():
        vals = [r[metric] for r in rs]
        mean = sum(vals) / len(vals)
        removed = sum(r.get("achieved_sparsity", r["sparsity"]) for r in rs) / len(rs)
        if metric == "accuracy":
            value = (f"{pct(mean)} (seeds {pct(min(vals))}-{pct(max(vals))}, n={len(vals)})" if len(rs) > 1
                     else interval(mean, rs[0].get("accuracy_interval")))
        else:
            value = f"{mean:.3g}" + (f" (seeds {min(vals):.3g}-{max(vals):.3g})" if len(rs) > 1 else "")
        row = {"method": method, label: lab or "-", "neurons removed (%)": pct(removed), f"{metric}"
               + (" (%)" if metric == "accuracy" else ""): value}
        if dense is not None and metric == "accuracy":
            row["vs dense (points)"] = "-" if method == "dense" else f"{100 * (mean - dense[metric]):+.1f}"
            vs = rs[0].get("vs_dense") if len(rs) == 1 else None
            row["p (McNemar)"] = f"{vs['p_value']:.2g}" if vs else "-"
        out.append(row)
    return out
