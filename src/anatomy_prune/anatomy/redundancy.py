"""Neuron-level redundancy measures of the second paper (docs/finepruning.md §4), per neuron and per layer, for any
model (a pruned one included, measured as it is, after physical removal).

Sensitivity (first-order Taylor estimate of the loss change when neuron i is removed):
    per batch b:  a_i^(b) = | sum_k W1_ik g_W1,ik + b1_i g_b1,i + sum_j W2_ji g_W2,ji |
    sens_i = sum_b a_i^(b) / N_seq
with g the gradients of the batch-mean task loss. Gated FFNs (Llama) count the gate and the up row both as
"W1" (both are removed with the neuron); the down projection's bias belongs to no neuron and is left out.
The absolute value is taken per batch, so the number depends on the batch size (docs/finepruning.md §7.7): we keep it.

Uniqueness (uncentred cosine of the activations h [tokens, d_ff] fed to the down projection):
    G = sum H^T H, n = sum ||H_:,i||^2 over the whole analysis set; C = G / (sqrt(n n^T) + 1e-6), signed;
    neuron i is "similar" if some j > i (strict upper triangle) has C_ij >= 0.8 (only the lower index of a
    close pair counts); similar = #similar / #neurons over all layers; unique = 1 - similar.
Decision (docs/finepruning.md §7.5): padding tokens are left out of H (the code keeps them); a causal-LM block has none.
A dead neuron (all-zero activations) has C = 0 with every other neuron, so it counts as unique.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..hooks import layer_of, run_with_hooks
from ..models.families import Conv1D, base_model, ffn_sites, get_module, weight_out_in
from ..progress import tqdm

log = logging.getLogger(__name__)

SIMILAR_COS = 0.8
LossFn = Callable[[nn.Module, dict], Tensor]  # (model, batch) -> scalar batch-mean loss


def _grad_out_in(mod: nn.Module) -> Tensor:
    """The weight's gradient in [out, in] orientation (Conv1D stores [in, out]); zeros when the weight took
    no part in the loss (an emptied layer's down projection)."""
    g = mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
    return g.t() if (Conv1D and isinstance(mod, Conv1D)) else g


def taylor_terms(model: nn.Module) -> list[Tensor]:
    """Per layer, the signed first-order term of each neuron from the gradients now stored: [d_ff] each."""
    base = base_model(model)
    out = []
    for site in ffn_sites(model):
        down = get_module(base, site.down)
        t = (weight_out_in(down) * _grad_out_in(down)).sum(dim=0)  # [d_ff]: W2 column . its gradient
        for path in site.up:
            up = get_module(base, path)
            t = t + (weight_out_in(up) * _grad_out_in(up)).sum(dim=1)  # W1 row . its gradient
            if getattr(up, "bias", None) is not None and up.bias.grad is not None:
                t = t + up.bias * up.bias.grad
        out.append(t.detach().float())
    return out


def cosine_similar(gram: Tensor, sq_norms: Tensor, threshold: float = SIMILAR_COS) -> tuple[Tensor, Tensor]:
    """From accumulated statistics: (similar flag per neuron [m] bool, max upper-triangle cosine [m]).

    C_ij = G_ij / (sqrt(n_i n_j) + 1e-6), signed; neuron i is similar if max_{j>i} C_ij >= threshold."""
    m = gram.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    c = gram.double() / (torch.sqrt(torch.outer(sq_norms.double(), sq_norms.double())) + 1e-6)
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=c.device), diagonal=1)
    c = c.masked_fill(~upper, float("-inf"))
    best = c.max(dim=1).values  # [m]; the last neuron has no j > i: -inf
    return best >= threshold, best.clamp(min=-1.0).float()


def _accumulate_gram(grams: list, sqs: list, token_mask: list):
    """A hook that adds H^T H and ||H_:,i||^2 of each FFN hidden activation (padding rows dropped)."""
    def hook(x: Tensor, point: str) -> None:
        layer = layer_of(point)
        h = x.detach().float().flatten(0, -2)  # [batch*pos, d_ff]
        if token_mask[0] is not None and token_mask[0].numel() == h.shape[0]:
            h = h[token_mask[0].reshape(-1).to(h.device) > 0]
        grams[layer] = grams[layer] + h.t() @ h
        sqs[layer] = sqs[layer] + (h * h).sum(dim=0)
    return hook


def measure(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn, threshold: float = SIMILAR_COS,
            progress: bool = True) -> dict:
    """Sensitivity and uniqueness of every FFN neuron of `model` on `batches` (each a dict with input_ids,
    optionally attention_mask and labels). Returns per-layer summaries and per-neuron vectors (JSON-ready)."""
    base = base_model(model)
    sites = ffn_sites(model)
    ffn_params = set()
    for site in sites:
        for path in site.up + (site.down,):
            ffn_params.update(id(p) for p in get_module(base, path).parameters())
    was_training = model.training
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved_flags:
        p.requires_grad_(id(p) in ffn_params)  # only the FFN weights need gradients
    dev = next(model.parameters()).device
    widths = [weight_out_in(get_module(base, s.down)).shape[1] for s in sites]
    sens = [torch.zeros(w, device=dev) for w in widths]
    grams = [torch.zeros(w, w, device=dev) for w in widths]
    sqs = [torch.zeros(w, device=dev) for w in widths]
    token_mask: list[Tensor | None] = [None]
    n_seq = n_tok = 0
    model.eval()  # no dropout: the measure is of the model as it is used
    try:
        with run_with_hooks(model, {"ffn.*.hidden": _accumulate_gram(grams, sqs, token_mask)}):
            for batch in tqdm(list(batches), desc="redundancy", disable=not progress, leave=False):
                token_mask[0] = batch.get("attention_mask")
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                for layer, t in enumerate(taylor_terms(model)):
                    sens[layer] += t.abs()
                n_seq += int(batch["input_ids"].shape[0])
                am = batch.get("attention_mask")
                n_tok += int(am.sum()) if am is not None else int(batch["input_ids"].numel())
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if n_seq == 0:
        raise ValueError("no batches to measure redundancy on")
    layers, per_sens, per_sim, per_cos = [], [], [], []
    for layer, w in enumerate(widths):
        s = (sens[layer] / n_seq).cpu()
        flags, best = cosine_similar(grams[layer].cpu(), sqs[layer].cpu(), threshold)
        n_sim = int(flags.sum())
        layers.append({"layer": layer, "width": w, "sensitivity_sum": float(s.sum()),
                       "sensitivity_mean": float(s.mean()) if w else 0.0, "similar": n_sim,
                       "unique_fraction": 1.0 - n_sim / w if w else None})
        per_sens.append([round(float(x), 8) for x in s])
        per_sim.append(flags.int().tolist())
        per_cos.append([round(float(x), 5) for x in best])
    total = sum(widths)
    similar = sum(lay["similar"] for lay in layers) / max(1, total)
    return {"threshold": threshold, "n_sequences": n_seq, "n_tokens": n_tok, "neurons": total,
            "sens_sum": sum(lay["sensitivity_sum"] for lay in layers), "similar": similar, "unique": 1.0 - similar,
            "layers": layers,
            "per_neuron": {"sensitivity": per_sens, "similar": per_sim, "max_cos_upper": per_cos}}


def summary(result: dict) -> dict:
    """The per-layer part of a `measure` result, without the per-neuron vectors."""
    return {k: v for k, v in result.items() if k != "per_neuron"}


def redundancy_of(model: nn.Module, task, analysis_size: int, progress: bool = True) -> dict:
    """Sensitivity and uniqueness of every FFN neuron of `model` (as it is, pruned or not) on the first
    `analysis_size` examples of a training task (train.ClassifyTask or train.LMTask)."""
    if analysis_size <= 0:
        from ..errors import UserError
        raise UserError(f"--analysis-size must be positive, got {analysis_size}")
    return measure(model, task.analysis_batches(analysis_size), task.loss, progress=progress)
