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
