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
