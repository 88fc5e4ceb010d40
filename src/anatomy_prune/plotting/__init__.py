"""Figures. One function per figure, each taking saved results (never a model), so figures can be redrawn
from a run folder. `save(fig, folder, name)` writes PNG and PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402


# Display names of the models the notebooks and the demo study (aliases and hub ids), for titles.
MODEL_NAMES = {"minilm": "MiniLM-L6", "smollm2": "SmolLM2-135M", "bert-base-uncased": "BERT-base (uncased)",
               "gpt2": "GPT-2", "mpnet-base": "MPNet-base"}


def model_label(spec: str, base: str | None = None, kind: str | None = None) -> str:
    """A model's name for a title: "MiniLM-L6, fine-tuned" for a fine-tuned folder, never its path."""
    def name(s: str) -> str:
        return MODEL_NAMES.get(s, s.rsplit("/", 1)[-1] if s.startswith(("/", ".", "runs")) else s)

    if base and base != spec:
        return name(base) + (", fine-tuned" if kind == "classifier" else "")
    return name(spec)


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
