"""`anatomy-prune finetune`: fine-tune the paper's binary classifier on IMDB (or a user file) into a run
folder that later commands take as a model spec.

The run folder holds `model/` and `finetune.json` (the settings and the training metrics). Running the same
fine-tune again finds the folder (its marker records the settings) and reuses it instead of training; a
folder of another fine-tune is refused unless `force`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.splits import load_splits
from ..errors import UserError
from ..evaluate.metrics import evaluate_classifier
from ..models.classifier import BinaryClassifier
from ..models.loading import Loaded, load_model, max_length_for
from ..models.saved import save_model
from ..runfolder import RunFolder, now_iso, read_json
from ..train.finetune import FinetuneConfig, train_classifier

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    metrics: dict = field(default_factory=dict)
    reused: bool = False


def finetune(cfg: FinetuneConfig, out: str | Path, device: str | None = None, force: bool = False,
             progress: bool = True, dtype: str | None = None) -> FinetuneResult:
    """Fine-tune `cfg.model` with a binary head; write `out/model/` and `out/finetune.json`."""
    cfg.validate()
    settings = cfg.settings() if dtype in (None, "auto", "float32") else {**cfg.settings(), "dtype": dtype}
    with RunFolder(out, "finetune", settings, force=force) as rf:
        run_dir = rf.path
        if rf.same_as_before and not force and rf.existing("model") and rf.existing("finetune.json"):
            log.info("reusing the fine-tuned model in %s (same settings)", run_dir)
            return FinetuneResult(run_dir, run_dir / "model", read_json(run_dir / "finetune.json")["metrics"], True)
        splits = load_splits(cfg.data, (cfg.train_size, cfg.val_size, cfg.test_size), cfg.seed)
        if len(set(splits.train.labels)) < 2:
            raise UserError("the training split has a single class; give more data or another seed")
        base = load_model(cfg.model, device=device, dtype=dtype)
        if base.kind == "classifier":
            raise UserError(f"'{cfg.model}' is already a fine-tuned classifier; fine-tune its base model instead")
        max_length_for(base, cfg.max_length)  # checks it against the model's positions
        # the saved tokenizer keeps this, so every later command reads reviews the same way
        base.tokenizer.truncation_side = "left" if cfg.truncation == "tail" else "right"
        torch.manual_seed(cfg.seed)
        model = BinaryClassifier(base.model, dropout=cfg.dropout).to(base.device)
        loaded = Loaded(model=model, tokenizer=base.tokenizer, kind="classifier", spec=str(run_dir / "model"),
                        info={"base_model": base.base_spec, "max_length": cfg.max_length}, dtype=base.dtype)
        metrics = train_classifier(loaded, splits.train, cfg, progress)
        if len(splits.validation):
            val = evaluate_classifier(loaded, splits.validation, batch_size=32, max_length=cfg.max_length,
                                      progress=progress)
            metrics["val_accuracy"] = val["accuracy"]
        save_model(loaded, rf.stage("model"), finetune=asdict(cfg), max_length=cfg.max_length)
        rf.write_json("finetune.json", {"config": asdict(cfg), "metrics": metrics, "dtype": loaded.dtype,
                                        "device": str(loaded.device), "created": now_iso()})
    log.info("fine-tuned %s in %.0f s; validation accuracy %s", cfg.model, metrics["train_s"],
             metrics.get("val_accuracy"))
    return FinetuneResult(run_dir, run_dir / "model", metrics, False)
