"""Fine-tune the paper's binary classifier on IMDB (or a user file) and write a reusable run folder.

A run folder holds `model/` (a model spec for every other command), `finetune.json` (the settings and the
training metrics). Running the same fine-tune again finds the folder and reuses it instead of training.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .classifier import BinaryClassifier
from .data import DEFAULT_SIZES, batches, check_max_length, load_splits, to_device
from .errors import UserError
from .evaluate import evaluate_classifier
from .io import atomic_dir, now_iso, read_json, save_model, write_json
from .models import Loaded, load_model, resolve_saved

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Everything that decides the fine-tuned weights; two runs with equal configs give the same model."""

    model: str = "minilm"
    data: str = "imdb"
    train_size: int = 4_000
    val_size: int = 500
    test_size: int = DEFAULT_SIZES[2]
    max_length: int = 128
    truncation: str = "tail"         # keep a long review's end (its verdict) rather than its start
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1
    freeze_embeddings: bool = True   # word embeddings are half of MiniLM's weights; freezing them halves step time
    seed: int = 0

    def validate(self) -> None:
        for name in ("train_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise UserError(f"--lr must be in (0, 1), got {self.lr}")
        if self.truncation not in ("head", "tail"):
            raise UserError(f"--truncation must be head or tail, got {self.truncation}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    metrics: dict = field(default_factory=dict)
    reused: bool = False


def _same_settings(run_dir: Path, cfg: FinetuneConfig) -> bool | None:
    """True if run_dir holds a finished fine-tune with these settings, False if different ones, None if none."""
    record = run_dir / "finetune.json"
    if not record.is_file() or resolve_saved(run_dir) is None:
        return None
    return read_json(record).get("config") == asdict(cfg)


def finetune(cfg: FinetuneConfig, out: str | Path, device: str | None = None, force: bool = False,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune `cfg.model` with a binary head; write `out/model/` and `out/finetune.json`."""
    cfg.validate()
    run_dir = Path(out)
    same = _same_settings(run_dir, cfg)
    if same and not force:
        log.info("reusing the fine-tuned model in %s (same settings)", run_dir)
        return FinetuneResult(run_dir, run_dir / "model", read_json(run_dir / "finetune.json")["metrics"], True)
    if same is False and not force:
        raise UserError(f"'{run_dir}' holds a fine-tune with other settings; use --force to replace it "
                        "or choose another --out")
    splits = load_splits(cfg.data, (cfg.train_size, cfg.val_size, cfg.test_size), cfg.seed)
    if len(set(splits.train.labels)) < 2:
        raise UserError("the training split has a single class; give more data or another seed")
    base = load_model(cfg.model, device=device)
    if base.kind == "classifier":
        raise UserError(f"'{cfg.model}' is already a fine-tuned classifier; fine-tune its base model instead")
    check_max_length(base.tokenizer, cfg.max_length, base.max_positions)

    # the saved tokenizer keeps this, so every later command reads reviews the same way
    base.tokenizer.truncation_side = "left" if cfg.truncation == "tail" else "right"
    torch.manual_seed(cfg.seed)
    model = BinaryClassifier(base.model, dropout=cfg.dropout).to(base.device)
    loaded = Loaded(model=model, tokenizer=base.tokenizer, kind="classifier", spec=str(run_dir / "model"),
                    info={"base_model": base.base_spec})
    metrics = train(loaded, splits.train.texts, splits.train.labels, cfg, progress)
    if len(splits.validation):
        val = evaluate_classifier(loaded, splits.validation, batch_size=32, max_length=cfg.max_length,
                                  progress=progress)
        metrics["val_accuracy"] = val["accuracy"]
    with atomic_dir(run_dir) as tmp:
        save_model(loaded, tmp / "model", finetune=asdict(cfg), max_length=cfg.max_length)
        write_json(tmp / "finetune.json", {"config": asdict(cfg), "metrics": metrics, "created": now_iso()})
    log.info("fine-tuned %s in %.0f s; validation accuracy %s", cfg.model, metrics["train_s"],
             metrics.get("val_accuracy"))
    return FinetuneResult(run_dir, run_dir / "model", metrics, False)


def train(loaded: Loaded, texts: list[str], labels: list[int], cfg: FinetuneConfig, progress: bool = True) -> dict:
    """AdamW with linear warm-up and decay, binary cross-entropy on the readout logit."""
    model, device = loaded.model, loaded.device
    if cfg.freeze_embeddings:
        emb = model.backbone.get_input_embeddings()
        emb.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_total = max(1, int(round(cfg.epochs * len(texts))))
    order: list[int] = []
    rng = random.Random(cfg.seed)
    while len(order) < n_total:
        epoch = list(range(len(texts)))
        rng.shuffle(epoch)
        order.extend(epoch)
    order = order[:n_total]
    steps = (n_total + cfg.batch_size - 1) // cfg.batch_size
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="fine-tune", disable=not progress)
    for step in bar:
        ids = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = next(batches(loaded.tokenizer, [texts[i] for i in ids], len(ids), cfg.max_length,
                             [labels[i] for i in ids]))
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = loss_fn(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"train_s": time.perf_counter() - start, "steps": steps, "examples_seen": n_total,
            "final_loss": sum(losses[-20:]) / len(losses[-20:])}
