"""What the notebooks share: where they run (online with the paper's hub models, or offline with the embedded
ones), at which sizes (smoke or full), and the classifier they study. Notebooks stay short: a parameters
cell (tagged `parameters`, the papermill convention), `setup(...)`, then calls into the library.

Online (Colab, or ANATOMY_PRUNE_ONLINE=1): bert-base-uncased / gpt2 fine-tuned on the hub's IMDB with the
paper's recipe (`train.finetune.PRESETS`: paper-bert, paper-gpt2). Offline: MiniLM fine-tuned as `make demo`
does (reused from runs/demo when it is there); SmolLM2-135M with a binary head for the GPT-2 notebooks, and as
a language model for fine-pruning.
Smoke (ANATOMY_PRUNE_SMOKE=1): the same path at a few examples, so CI can run every notebook.

`setup` also makes the outputs clean (`quiet`: no progress bars, log lines or warnings; a UserError shown
as one line) and checks the parameters cell's values before any work (`check_*`: a one-line message that
says what to set).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError
from .train.finetune import FinetuneConfig, preset
from .validate import finite, fraction, positive_int, whole

QUIET_LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "torch", "anatomy_prune", "matplotlib")


def quiet() -> None:
    """Clean notebook outputs: no progress bars (TQDM_DISABLE, the hub's and datasets' bars off), library
    logging at ERROR, warnings ignored; in IPython a UserError prints as one line, not a traceback."""
    import logging
    import warnings

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"          # read when datasets is imported (online mode)
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers missing or older: nothing to silence
        pass
    if "datasets" in sys.modules:  # imported before: its level was set already
        from datasets.utils import logging as ds_logging
        from datasets.utils.tqdm import disable_progress_bars
        ds_logging.set_verbosity_error()
        disable_progress_bars()
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        def one_line(shell, etype, value, tb, tb_offset=None):
            print(f"{etype.__name__}: {value}", file=sys.stderr)
        shell.set_custom_exc((UserError,), one_line)


def _retold(check, message: str):
    """check() with its fault told in the notebook's words (what to set), as one line."""
    try:
        return check()
    except UserError:
        raise UserError(message) from None


def _open_fraction(v, what: str) -> float:
    if fraction(v, what) == 0.0:
        raise UserError(f"{what} must be > 0, got {v}")
    return float(v)


def check_fractions(values, what: str) -> list[float]:
    """Each value a fraction strictly between 0 and 1 (a share of neurons removed)."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    if not values:
        raise UserError(f"{what} is empty; set it to fractions such as [0.1, 0.3, 0.5]")
    return [_retold(lambda: _open_fraction(v, what),
                    f"{what} holds {v!r}; set fractions strictly between 0 and 1, such as 0.5 (= 50%)") for v in values]


def check_positive(value, what: str, example: int) -> int:
    """A whole number >= 1 (a size, a count of steps or seeds)."""
    return _retold(lambda: positive_int(value, what),
                   f"{what} is {value!r}; set a whole number of at least 1, such as {example}")


def check_block(value, n_blocks: int, what: str) -> int | None:
    """A block number of the model (0 .. n_blocks - 1), or None."""
    if value is None:
        return None
    return _retold(lambda: whole(value, what, 0, n_blocks - 1),
                   f"{what} is {value!r}; set a block number from 0 to {n_blocks - 1}, or None")


def check_numbers(values, what: str, example: str) -> list[float]:
    """Non-negative finite numbers (alpha, beta)."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    return [_retold(lambda: finite(v, what, 0.0), f"{what} holds {v!r}; set non-negative numbers such as {example}")
            for v in values]


def check_model(spec: str | None, online: bool) -> str | None:
    """An embedded alias, a model folder, or (online) a hub id; None keeps the mode's default."""
    if spec is None:
        return None
    from .models.loading import ALIASES

    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"MODEL is {spec!r}; set None (the mode's default) or a model name such as 'minilm'")
    if spec in ALIASES or Path(spec).is_dir() or online:  # online, a hub id is checked when it is loaded
        return spec
    raise UserError(f"MODEL '{spec}' is neither an embedded model ({', '.join(sorted(ALIASES)[:6])}, ...) nor a "
                    "folder; set one of those, or ONLINE = True for a hub id")


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
        if not self.online and not self.smoke and self.family == "bert" and self.finetune == preset("demo"):
            return self.runs / "demo" / "finetune"   # the same fine-tune as `make demo`, reused
        mode = ("smoke-" if self.smoke else "") + ("online-" if self.online else "")
        return self.runs / f"finetune-{mode}{self.finetune.model.replace('/', '--')}"

    def out(self, name: str) -> Path:
        return self.runs / "notebooks" / (("smoke-" if self.smoke else "") + ("online-" if self.online else "") + name)

    def describe(self) -> list[dict]:
        """The settings as table rows (setting, value), for the notebook's first output."""
        from .plotting import model_label

        ft = self.finetune
        how = ("used as it is (no fine-tune)" if ft is None else
               f"{model_label(ft.model)} fine-tuned with a binary head on {ft.train_size:,} {'hub ' if ft.data == 'hf' else ''}"
               f"IMDB reviews ({ft.epochs:g} epoch, {ft.max_length} tokens, lr {ft.lr:g})")
        rows = [("mode", ("online" if self.online else "offline") + (", smoke sizes" if self.smoke else "")),
                ("model studied", how if ft is not None else f"{model_label(self.base)}, {how}"),
                ("evaluation texts", f"{self.eval_size:,} ({self.data} test split)"),
                ("calibration texts", f"{self.calib_size:,}"),
                ("sparsities", ", ".join(f"{100 * s:g}%" for s in self.sparsities)),
                ("seeds of random methods", str(self.seeds))]
        return [{"setting": k, "value": v} for k, v in rows] + [{"setting": "note", "value": n} for n in self.notes]

    def classifier(self):
        """The fine-tuned classifier's FinetuneResult (model_dir, metrics, reused): trained here, or reused
        from a run folder with the same recipe (e.g. the one `make demo` wrote). Quiet (no progress bars)."""
        from .pipeline.finetune import finetune

        if self.finetune is None:
            raise UserError("this mode studies the base model as it is; there is no fine-tuned classifier")
        return finetune(self.finetune, self.run_dir, progress=False)

    def model(self, progress: bool = True) -> str:
        """The model spec the notebook studies: the fine-tuned classifier (trained, or reused when a run folder
        with the same recipe is there), or the base model itself."""
        if self.finetune is None:
            return self.base
        from .pipeline.finetune import finetune

        return str(finetune(self.finetune, self.run_dir, progress=progress).model_dir)


@dataclass(frozen=True)
class Params:
    """A notebook's parameters cell, checked once when built. online / smoke / runs: None reads
    ANATOMY_PRUNE_ONLINE (default: online in Colab), ANATOMY_PRUNE_SMOKE and ANATOMY_PRUNE_RUNS (default: ../runs,
    beside the notebooks); sparsities, eval_size, model, calib_size, seeds: None keeps the mode's default."""

    online: bool | None = None
    smoke: bool | None = None
    runs: str | Path | None = None
    sparsities: list[float] | None = None
    eval_size: int | None = None
    model: str | None = None
    calib_size: int | None = None
    seeds: int | None = None

    def __post_init__(self) -> None:
        if self.sparsities is not None:
            object.__setattr__(self, "sparsities", check_fractions(self.sparsities, "SPARSITIES"))
        for value, what, example in ((self.eval_size, "EVAL_SIZE", 1000), (self.calib_size, "CALIB_SIZE", 256),
                                     (self.seeds, "SEEDS", 3)):
            if value is not None:
                check_positive(value, what, example)
        online = _flag(self.online, "ANATOMY_PRUNE_ONLINE", "google.colab" in sys.modules)
        object.__setattr__(self, "online", online)
        object.__setattr__(self, "smoke", _flag(self.smoke, "ANATOMY_PRUNE_SMOKE", False))
        object.__setattr__(self, "runs", Path(self.runs or os.environ.get("ANATOMY_PRUNE_RUNS") or "../runs"))
        object.__setattr__(self, "model", check_model(self.model, online))


def _recipe(family: str, online: bool, smoke: bool) -> tuple[FinetuneConfig | None, str, str, list[str]]:
    """The mode's fine-tune recipe, base model, data and notes, for a family (bert or gpt2)."""
    small = dict(train_size=16, val_size=8, test_size=16, max_length=32, batch_size=8)  # online smoke: full-size models
    if family == "bert":
        ft = preset("paper-bert", **(small if smoke else {})) if online else preset("smoke" if smoke else "demo")
        return ft, ft.model, ft.data, []
    if online:
        ft = preset("paper-gpt2", **(small if smoke else {}))
        return ft, ft.model, "hf", []
    if smoke:
        return replace(preset("smoke"), model="tiny-gpt2"), "tiny-gpt2", "imdb", []
    ft = preset("offline-gpt2")   # the paper's GPT-2 experiment on a CPU: SmolLM2-135M, binary head on the last token
    return ft, ft.model, ft.data, ["offline on a CPU, SmolLM2-135M (dequantized from a 4-bit GGUF) stands in for "
                                   "GPT-2, fine-tuned at CPU size (train.finetune.PRESETS['offline-gpt2']); online, "
                                   "gpt2 is fine-tuned with the paper's recipe"]


def setup(family: str, params: Params | None = None, offline: dict | None = None) -> Setup:
    """Settings of a notebook: its family (bert or gpt2), its parameters cell (Params) and, in `offline`, the
    notebook's own defaults offline at full size (keys eval_size, sparsities), where they differ."""
    quiet()
    p, own = params or Params(), dict(offline or {})
    if family not in ("bert", "gpt2"):
        raise UserError(f"family must be bert or gpt2, got {family!r}")
    online, smoke = p.online, p.smoke
    ft, base, data, notes = _recipe(family, online, smoke)
    if p.model is not None:  # another model studied the same way: fine-tuned with the mode's recipe, or as it is
        ft = replace(ft, model=p.model) if ft is not None else None
        base = p.model
    return Setup(family=family, online=online, smoke=smoke, runs=p.runs, finetune=ft, base=base,
                 eval_size=p.eval_size or (8 if smoke else own.get("eval_size", 1000) if ft is not None and not online
                                           else 1000 if ft is not None else 64),
                 calib_size=p.calib_size or (8 if smoke else 256),
                 sparsities=p.sparsities or ([0.5] if smoke else own.get("sparsities", [0.1, 0.3, 0.5, 0.7, 0.9])
                                             if not online else [0.1, 0.3, 0.5, 0.7, 0.9]), data=data,
                 seeds=p.seeds or (2 if smoke else 5), notes=notes)
