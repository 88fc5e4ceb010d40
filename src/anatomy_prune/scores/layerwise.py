"""Statistics one block at a time: what a layer-wise pass (pipeline.layerwise) needs to score a block without
running the whole model, so that only one block's activations are held at once.

`block_inputs` captures block 0's inputs over the calibration batches (a pre-hook records the call's args and
stops the forward); every block is then called with those arguments, its outputs being the next block's
inputs. `block_ffn_stats` feeds one block's FFN activations to the same Gram accumulator as the whole-model
pass (scores.accumulators.TokenGram), so on the dense model's inputs the two give the same matrices.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..hooks import ffn_hidden, run_with_cache
from ..models.families import base_model, family_of, get_module, in_features
from .accumulators import TokenGram, Tokens
from .calibration import Calibration, FFNStats

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capturing pre-hook: nothing after block 0's inputs is computed."""


@dataclass
class BlockBatch:
    """One calibration batch as a block receives it (everything but the hidden states, which change)."""

    args: tuple          # positional arguments after the hidden states (GPT-2, BERT: the attention mask, ...)
    kwargs: dict         # keyword arguments (attention mask, position embeddings and ids for Llama, ...)
    mask: Tensor         # [batch, pos] bool: real (non-padding) tokens


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return get_module(base_model(model), family_of(model).layers)


@torch.no_grad()
def block_inputs(loaded, calib: Calibration) -> tuple[list[BlockBatch], list[Tensor]]:
    """The calibration batches as block 0 receives them: per batch its arguments, and its hidden states
    ([batch, pos, d_model] each). Runs the embeddings only (the forward stops at block 0)."""
    if not calib.texts:
        raise UserError("layer-wise pruning needs calibration texts; give --calib-size N with N > 0")
    model = loaded.model
    base = base_model(model)
    block0 = blocks_of(model)[0]
    seen: dict = {}

    def grab(_module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _StopForward

    extra = {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}
    batches, hidden = [], []
    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in calib.batches():
            try:
                with loaded.autocast():
                    base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model's forward never called its first block")
            args, kwargs = seen.pop("args"), dict(seen.pop("kwargs"))
            h = args[0] if args else kwargs.pop("hidden_states")
            batches.append(BlockBatch(tuple(args[1:]), kwargs, batch["attention_mask"].bool()))
            hidden.append(h)
    finally:
        handle.remove()
        model.train(was_training)
    return batches, hidden


@torch.no_grad()
def run_block(loaded, block: nn.Module, batches: list[BlockBatch], hidden: list[Tensor]) -> list[Tensor]:
    """The block's outputs on stored inputs, one batch at a time: [batch, pos, d_model] each."""
    outs = []
    for b, h in zip(batches, hidden):
        with loaded.autocast():
            out = block(h, *b.args, **b.kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@torch.no_grad()
def block_ffn_stats(loaded, layer: int, batches: list[BlockBatch], hidden: list[Tensor]
                    ) -> tuple[Tensor, list[Tensor]]:
    """Run block `layer` over its inputs: the Gram matrix of its FFN hidden activation [h; 1] over real
    tokens ([d_ff+1, d_ff+1] float64, on the block's device) and the block's outputs."""
    block = blocks_of(loaded.model)[layer]
    tokens, outs = Tokens(), []
    with run_with_cache(loaded.model, ffn_hidden(layer), TokenGram(tokens)) as cache:
        for b, h in zip(batches, hidden):
            tokens.set(b.mask)
            outs += run_block(loaded, block, [b], [h])
    if ffn_hidden(layer) not in cache:
        raise RuntimeError(f"block {layer}'s FFN was never called")
    return cache[ffn_hidden(layer)], outs


def stats_of(grams: list[Tensor], batches: list[BlockBatch], calib: Calibration, seconds: float = 0.0) -> FFNStats:
    """Per-block Gram matrices as the FFNStats that ffn_input_stats returns (without gradients)."""
    n_tokens = int(sum(int(b.mask.sum()) for b in batches))
    return FFNStats(gram=[g.cpu() for g in grams], n_tokens=n_tokens,
                    n_examples=int(sum(b.mask.shape[0] for b in batches)),
                    info={"max_length": calib.max_length, "batch_size": calib.batch_size,
                          "n_texts": len(calib.texts), "seconds": round(seconds, 2), "layerwise": True})


def check_width(down: nn.Module, gram: Tensor, layer: int) -> None:
    if gram.shape[0] != in_features(down) + 1:
        raise ValueError(f"block {layer}: a Gram of {gram.shape[0] - 1} neurons for an FFN of {in_features(down)}")
