"""The one training loop: AdamW, linear warm-up then linear decay, gradient clipping, word embeddings
optionally frozen. Fine-tuning and fine-pruning both run it; what differs (the loss of a step, masks set
before it, statistics after the backward pass) comes in as callables."""
from __future__ import annotations

import contextlib
import math
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..progress import tqdm


@dataclass(frozen=True)
class Optim:
    """Optimiser and schedule settings of a training run."""

    lr: float
    weight_decay: float
    warmup: float                 # fraction of the steps spent warming the learning rate up
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0    # 0: no clipping
    freeze_embeddings: bool = True


def warmup_decay(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at step s: linear warm-up over max(1, int(warmup * steps)) steps, then linear
    decay to zero at `steps`."""
    warm = max(1, int(warmup * steps))
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))


@contextmanager
def frozen_embeddings(model: nn.Module, freeze: bool = True) -> Iterator[list[nn.Parameter]]:
    """Freeze the input (word) embeddings (a tied LM head with them) while inside; restored after."""
    inner = getattr(model, "backbone", model)
    emb = inner.get_input_embeddings().weight
    frozen = [emb] if freeze and emb.requires_grad else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield frozen
    finally:
        for p in frozen:
            p.requires_grad_(True)


StepLoss = Callable[[int], dict[str, Tensor]]  # step -> {"loss": ..., optional others added to it ("reg")}


@dataclass(frozen=True)
class LoopHooks:
    """What a caller adds to the loop: parameter groups (e.g. learnable mask scores), a callable run after
    each backward pass, and one that returns extra progress-bar fields for step t."""

    extra_groups: Sequence[dict] = ()
    after_backward: Callable[[int], None] | None = None
    postfix: Callable[[int], dict] | None = None


@dataclass(frozen=True)
class Precision:
    """Mixed precision: `autocast` wraps each step's forward pass (weights and optimiser stay float32);
    `scale_loss` scales the loss against float16 underflow (torch.amp.GradScaler, CUDA float16)."""

    autocast: Callable[[], AbstractContextManager] | None = None
    scale_loss: bool = False

    @classmethod
    def of(cls, loaded) -> "Precision":
        """A loaded model's: its autocast, and loss scaling when its weights are float16."""
        return cls(loaded.autocast, loaded.dtype == "float16")


def train_loop(model: nn.Module, steps: int, step_loss: StepLoss, optim: Optim, *, hooks: LoopHooks = LoopHooks(),
               precision: Precision = Precision(), desc: str = "train", progress: bool = True) -> dict[str, list]:
    """Train `model` in place for `steps` steps; returns the history (loss and any other terms per step)
    with `train_s`. `step_loss(t)` builds step t's batch and returns its loss terms; their sum is
    back-propagated."""
    extra_groups, after_backward, postfix = hooks.extra_groups, hooks.after_backward, hooks.postfix
    autocast, scale_loss = precision.autocast, precision.scale_loss
    hist: dict[str, list] = {"loss": []}
    was_training = model.training
    with frozen_embeddings(model, optim.freeze_embeddings):
        weights = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": weights, "lr": optim.lr, "weight_decay": optim.weight_decay}, *extra_groups]
        opt = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, eps=optim.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(steps, optim.warmup))
        model.train()
        scaler = torch.amp.GradScaler(enabled=scale_loss)
        start = time.perf_counter()
        bar = tqdm(range(steps), desc=desc, disable=not progress)
        try:
            for t in bar:
                with (autocast() if autocast else contextlib.nullcontext()):
                    terms = step_loss(t)
                scaler.scale(sum(terms.values())).backward()
                if after_backward is not None:
                    after_backward(t)
                scaler.unscale_(opt)
                if optim.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(weights, optim.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    hist.setdefault(k, []).append(v.item())
                if not math.isfinite(hist["loss"][-1]):
                    raise UserError(f"the loss became {hist['loss'][-1]} at step {t}; lower the learning rate")
                recent = hist["loss"][-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", **(postfix(t) if postfix else {}))
        finally:
            model.train(was_training)
            model.eval()
    hist["train_s"] = time.perf_counter() - start
    return hist
