"""`make figures`: gather the figures of real runs into the repository's small `figures/` folder.

Anatomy figures are redrawn from their saved results (no model needed); every other run's `figures/*.png`
is copied, named after the folder it came from (e.g. demo_sweep_accuracy_vs_sparsity.png).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

from .errors import UserError

log = logging.getLogger(__name__)


def collect_figures(runs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Copy (after redrawing anatomy folders) every PNG under each run's `figures/` folders into `out`."""
    from .anatomy import redraw_anatomy_figures

    out = Path(out)
    written: list[Path] = []
    for run in map(Path, runs):
        if not run.is_dir():
            raise UserError(f"run folder '{run}' not found; run `make demo` (or the command that writes it) first")
        for fig_dir in sorted(run.rglob("figures")):
            if not fig_dir.is_dir() or "model" in fig_dir.parts:
                continue
            if (fig_dir.parent / "layer_similarity.json").is_file():
                redraw_anatomy_figures(fig_dir.parent)
            prefix = "_".join((run.name, *fig_dir.parent.relative_to(run).parts))
            for png in sorted(fig_dir.glob("*.png")):
                out.mkdir(parents=True, exist_ok=True)
                target = out / f"{prefix}_{png.name}"
                shutil.copyfile(png, target)
                written.append(target)
    log.info("collected %d figures into %s", len(written), out)
    return written
