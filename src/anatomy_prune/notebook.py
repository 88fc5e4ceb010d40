"""What the notebooks share: where they run (online with the paper's hub models, or offline with the embedded
ones), at which sizes (smoke or full), and the classifier they study. Notebooks stay short: a parameters
cell (tagged `parameters`, the papermill convention), `setup(...)`, then calls into the library.

Online (Colab, or ANATOMY_PRUNE_ONLINE=1): bert-base-uncased / gpt2 fine-tuned on the hub's IMDB with the
paper's recipe (`train.finetune.PRESETS`: paper-bert, paper-gpt2). Offline: MiniLM fine-tuned as `make demo`
does (reused from runs/demo when it is there), and SmolLM2-135M as a language model for the GPT notebooks.
Smoke (ANATOMY_PRUNE_SMOKE=1): the same path at a few examples, so CI can run every notebook.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError
from .train.finetune import FinetuneConfig, preset


def _flag(value, env: str, default: bool) -> bool:
    if value is not None:
        return bool(value)
    text = os.environ.get(env)
    return default if text is None else text.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Setup:
    family: str                 # "bert" or "gpt2"
    online: bool
    smoke: bool
    runs: Path
    finetune: FinetuneConfig | None   # None: the model is used as it is (SmolLM2 as a language model)
    base: str                   # the model spec before fine-tuning
    eval_size: int
    calib_size: int
    sparsities: list[float]
    data: str                   # imdb (offline) or hf (the hub's IMDB)
    seeds: int = 5              # seeds of a random method at each point (2 in smoke mode)
    notes: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        if self.finetune is None:
            return self.runs / "notebooks" / "no-finetune"
        if not self.online and not self.smoke and self.family == "bert":
            return self.runs / "demo" / "finetune"   # the same fine-tune as `make demo`, reused
        mode = ("smoke-" if self.smoke else "") + ("online-" if self.online else "")
        return self.runs / f"finetune-{mode}{self.finetune.model.replace('/', '--')}"

    def out(self, name: str) -> Path:
        return self.runs / "notebooks" / (("smoke-" if self.smoke else "") + ("online-" if self.online else "") + name)

    def model(self, progress: bool = True) -> str:
        """The model spec the notebook studies: the fine-tuned classifier (trained, or reused when a run folder
        with the same recipe is there), or the base model itself."""
        if self.finetune is None:
            return self.base
        from .pipeline.finetune import finetune

        return str(finetune(self.finetune, self.run_dir, progress=progress).model_dir)


def setup(family: str, online: bool | None = None, smoke: bool | None = None, runs: str | Path | None = None,
          sparsities: list[float] | None = None, eval_size: int | None = None) -> Setup:
    """Settings of a notebook. online / smoke / runs: None reads ANATOMY_PRUNE_ONLINE (default: online in
    Colab), ANATOMY_PRUNE_SMOKE and ANATOMY_PRUNE_RUNS (default: ../runs, beside the notebooks)."""
    if family not in ("bert", "gpt2"):
        raise UserError(f"family must be bert or gpt2, got {family!r}")
    online = _flag(online, "ANATOMY_PRUNE_ONLINE", "google.colab" in sys.modules)
    smoke = _flag(smoke, "ANATOMY_PRUNE_SMOKE", False)
    runs = Path(runs or os.environ.get("ANATOMY_PRUNE_RUNS") or "../runs")
    small = dict(train_size=16, val_size=8, test_size=16, max_length=64, batch_size=8)
    notes = []
    if family == "bert":
        if online:
            ft = preset("paper-bert", **(small if smoke else {}))
        else:
            ft = preset("smoke") if smoke else preset("demo")
        base = ft.model
        data = ft.data
    else:
        if online:
            ft = preset("paper-gpt2", **(small if smoke else {}))
            base, data = ft.model, "hf"
        elif smoke:
            ft = replace(preset("smoke"), model="tiny-gpt2")
            base, data = "tiny-gpt2", "imdb"
        else:
            ft, base, data = None, "smollm2", "imdb"
            notes.append("offline on a CPU, SmolLM2-135M is studied as the language model it is (last-token "
                         "readout, perplexity as the metric); online, gpt2 is fine-tuned with a binary head "
                         "as in the paper")
    return Setup(family=family, online=online, smoke=smoke, runs=runs, finetune=ft, base=base,
                 eval_size=eval_size or (16 if smoke else (1000 if ft is not None else 64)),
                 calib_size=16 if smoke else 256,
                 sparsities=sparsities or ([0.5] if smoke else [0.1, 0.3, 0.5, 0.7, 0.9]), data=data,
                 seeds=2 if smoke else 5, notes=notes)
