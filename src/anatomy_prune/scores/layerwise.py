"""Statistics one block at a time: what a layer-wise pass (pipeline.layerwise) needs to score a block without
running the whole model, so that only one block's activations are held at once.

The inputs of block 0 over the calibration batches are captured by a pre-hook that records the call's
(args, kwargs) and stops the forward (`block_inputs`); every block is then called as
block(hidden, *args, **kwargs) with those same arguments (attention mask, position embeddings, ...), and its
outputs are the next block's inputs. `block_ffn_stats` runs one block over stored inputs with a hook on its
FFN hidden activation that sums the Gram matrix of [h; 1] over real tokens, exactly as
`scores.calibration.ffn_input_stats` does in one pass of the whole model (float32 per batch, float64 sums),
so on the dense model's inputs the two give the same matrices. `layer_removal_error` is
`scores.calibrated.removal_error` for one layer (the `calibrated` recipe's error term, FLAP-style: the error a
neuron's removal leaves after least-squares compensation), computed with the memory of two Gram-sized
matrices (an in-place Cholesky inverse) instead of five.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..hooks import ffn_hidden, run_with_hooks
from ..models.families import base_model, family_of, get_module, in_features
from .calibrated import layer_removal_error as calibrated_layer_error, unexplained_share
from .calibration import DEFAULT_RIDGE, Calibration, FFNStats

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
    model = loaded.model
    block = blocks_of(model)[layer]
    state: dict = {"gram": None}

    def accumulate(x: Tensor, _point: str) -> None:      # x: [batch, pos, d_ff]
        h = x.detach()[state["mask"].to(x.device)]         # [tokens, d_ff]
        z = torch.cat([h.float(), torch.ones(h.shape[0], 1, device=h.device)], dim=1)  # [tokens, d_ff+1]
        g = z.t() @ z                                      # float32, one batch (as calibration._collect)
        if state["gram"] is None:
            state["gram"] = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
        state["gram"] += g

    outs = []
    with run_with_hooks(model, {ffn_hidden(layer): accumulate}):
        for b, h in zip(batches, hidden):
            state["mask"] = b.mask
            outs += run_block(loaded, block, [b], [h])
    if state["gram"] is None:
        raise RuntimeError(f"block {layer}'s FFN was never called")
    return state["gram"], outs


def stats_of(grams: list[Tensor], batches: list[BlockBatch], calib: Calibration, seconds: float = 0.0) -> FFNStats:
    """Per-block Gram matrices as the FFNStats that ffn_input_stats returns (without gradients)."""
    n_tokens = int(sum(int(b.mask.sum()) for b in batches))
    return FFNStats(gram=[g.cpu() for g in grams], n_tokens=n_tokens,
                    n_examples=int(sum(b.mask.shape[0] for b in batches)),
                    info={"max_length": calib.max_length, "batch_size": calib.batch_size,
                          "n_texts": len(calib.texts), "seconds": round(seconds, 2), "layerwise": True})


# --- the calibrated recipe's error term, one layer --------------------------------------------------

def _inverse_diagonal_inplace(a: Tensor) -> Tensor | None:
    """diag(a^-1) for a symmetric positive definite float64 CPU matrix, overwriting `a` (LAPACK potrf/potri
    in place: no second matrix). None if `a` is not positive definite (or not on the CPU)."""
    if a.device.type != "cpu" or a.dtype != torch.float64 or not a.is_contiguous():
        return None
    from scipy.linalg import lapack

    try:  # as many BLAS threads as torch uses (oversubscribed threads are much slower on a shared CPU)
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=torch.get_num_threads(), user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limit = contextlib.nullcontext()
    with limit:
        arr = a.numpy().T                                   # F-ordered view of the symmetric matrix
        chol, info = lapack.dpotrf(arr, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        inv, info = lapack.dpotri(chol, lower=1, overwrite_c=1)
        if info != 0:
            return None
        return torch.from_numpy(inv.diagonal().copy())


def lean_unexplained_share(gram: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """`scores.calibrated.unexplained_share` with one Gram-sized temporary (the ridge covariance, inverted in
    place); equal to it up to rounding. Falls back to it where the in-place route does not apply."""
    g = gram.detach()
    if g.device.type != "cpu" or g.dtype != torch.float64:
        return unexplained_share(g.double().cpu(), ridge)
    n = g[-1, -1].clamp(min=1.0)
    mean = g[:-1, -1] / n                                    # [d_ff]
    cov = g[:-1, :-1] / n                                    # [d_ff, d_ff], the only big temporary
    cov.addr_(mean, mean, alpha=-1.0)                        # centred covariance
    var = torch.diagonal(cov).clamp(min=1e-12)               # a copy
    lam = ridge * float(var.mean())
    cov.diagonal().add_(lam)
    inv_diag = _inverse_diagonal_inplace(cov)
    del cov
    if inv_diag is None:
        return unexplained_share(g, ridge)
    return (1.0 / (var * inv_diag)).clamp(0.0, 1.0)


def layer_removal_error(down: nn.Module, gram: Tensor, rebuilt: bool = True, ridge: float = DEFAULT_RIDGE,
                        rows: int = 1024) -> Tensor:
    """`scores.calibrated.layer_removal_error` with the lean (in-place) unexplained share. [d_ff] float32."""
    return calibrated_layer_error(down, gram, rebuilt, ridge, share=lean_unexplained_share, rows=rows)


def check_width(down: nn.Module, gram: Tensor, layer: int) -> None:
    if gram.shape[0] != in_features(down) + 1:
        raise ValueError(f"block {layer}: a Gram of {gram.shape[0] - 1} neurons for an FFN of {in_features(down)}")
