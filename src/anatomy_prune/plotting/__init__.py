"""Figures. One function per figure, each taking saved results (never a model), so figures can be redrawn
from a run folder. `save(fig, folder, name)` writes PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, folder: str | Path, name: str, pdf: bool = True, dpi: int = 110) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    fig.savefig(png, dpi=dpi, bbox_inches="tight")
    if pdf:
        fig.savefig(folder / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return png


def show_figures(folder: str | Path, names: list[str] | None = None, width: int = 640) -> list[Path]:
    """Display saved PNG figures inline in a notebook (all of `folder`'s, or the named ones, in order)."""
    from IPython.display import Image, display

    folder = Path(folder)
    paths = [folder / f"{n}.png" for n in names] if names else sorted(folder.glob("*.png"))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no figure(s) {missing} in {folder}")
    for p in paths:
        display(Image(filename=str(p), width=width))
    return paths
