"""Cost models: what an FFN neuron and an attention head cost per forward pass, so that pruning can aim at a
constraint (`--target-flops 0.5`, `--target-speedup 2.0`) rather than a sparsity.

  flops    exact FLOPs per token from the shapes: a neuron costs 2 x (its up / gate rows + its down column);
           a head costs 2 x (its q, k, v rows + its o columns) + the attention scores and weighted sum over
           the sequence (4 x seq_len x head_dim). Base: everything else (other Linear layers, the head).
  params   parameters: a neuron owns its up / gate rows and its down column (and their bias entries); a head
           unit owns its query heads' q rows and o columns and one k and one v head (FLAP's and Wanda-sp's
           "share of the parameters removed"). Base: everything else, embeddings included.
  latency  measured: the model's own shapes are timed on the device at the given batch and length (dense,
           then FFNs and attention at reduced widths, physically pruned copies), and a linear model
           time = base + a_ffn x neurons + a_head x heads is fitted by least squares. It absorbs what FLOPs
           miss (memory traffic, kernel efficiency at narrow widths, fixed overheads) as an average per-unit
           cost; the fit's residuals are reported.
Both are linear in the number of units kept, which makes allocation under a budget a knapsack that the
allocator solves greedily by score per cost (plan.allocate.keep_under_budget).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.families import (attention_sites, base_model, family_of, ffn_sites, ffn_widths, get_module, head_counts,
                               set_module)
from ..models.loading import Loaded
from ..models.surgery import keep_ffn_neurons, keep_heads
from .timing import fixed_inputs, forward_fn, machine_info, time_interleaved

log = logging.getLogger(__name__)
KINDS = ("flops", "latency", "params")


@dataclass
class CostModel:
    kind: str                        # flops (per token) or latency (seconds per forward pass)
    base: float                      # what pruning cannot remove
    per_neuron: list[float]          # per layer, one FFN neuron
    per_head: list[float]            # per layer, one attention head (one KV group for grouped-query attention)
    neurons: list[int]               # units of the dense model, per layer
    heads: list[int]
    info: dict = field(default_factory=dict)

    @property
    def dense(self) -> float:
        return self.predict(self.neurons, self.heads)

    def predict(self, neurons: Sequence[int], heads: Sequence[int] | None = None) -> float:
        heads = self.heads if heads is None else heads
        return float(self.base + sum(a * n for a, n in zip(self.per_neuron, neurons))
                     + sum(a * h for a, h in zip(self.per_head, heads)))

    def to_dict(self) -> dict:
        return {**asdict(self), "dense": self.dense}

    @classmethod
    def saved(cls, path: str, loaded: Loaded, batch_size: int, seq_len: int) -> "CostModel":
        """A latency model an earlier `prune --target-speedup` wrote (its run folder's cost_model.json), checked
        against this model's dense widths and the target's shape: the same plan again without re-timing."""
        from ..safefiles import read_json

        d = read_json(path, "cost model")
        what = f"cost model '{path}'"
        try:
            cm = cls(str(d["kind"]), float(d["base"]), [float(a) for a in d["per_neuron"]],
                     [float(a) for a in d["per_head"]], [int(n) for n in d["neurons"]], [int(h) for h in d["heads"]],
                     dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{what} is not one anatomy-prune wrote; give a run folder's cost_model.json") from None
        numbers = [cm.base, *cm.per_neuron, *cm.per_head]
        if cm.kind != "latency" or not all(np.isfinite(numbers)) or min(numbers) < 0:
            raise UserError(f"{what} must be a latency model with finite, non-negative costs")
        if (cm.neurons != ffn_widths(loaded.model) or cm.heads != _attention_shape(loaded.model)[0]
                or cm.info.get("model") != model_signature(loaded)):
            raise UserError(f"{what} was fitted on another model ({cm.info.get('model')}, FFN widths {cm.neurons[:3]}...), "
                            "not this model's; give the dense model it was fitted on, or leave --cost-model out")
        shape = (cm.info.get("batch_size"), cm.info.get("seq_len"))
        if shape != (batch_size, seq_len):
            raise UserError(f"{what} was fitted at batch x length {shape[0]} x {shape[1]}, the target asks for "
                            f"{batch_size} x {seq_len}; give matching --target-batch / --target-length")
        return cm


def model_signature(loaded: Loaded) -> dict:
    """What a latency model is tied to besides its widths: the architecture and the device it was timed on."""
    cfg = base_model(loaded.model).config
    return {"model_type": str(cfg.model_type), "hidden": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0))),
            "layers": len(ffn_widths(loaded.model)), "kind": loaded.kind, "device": str(loaded.device)}


def _attention_shape(model: nn.Module) -> tuple[list[int], int, int]:
    """(units per layer, head_dim, query heads per unit) of the attention; units are heads, or KV groups for
    grouped-query attention."""
    cfg = base_model(model).config
    heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0)) or 0)
    d = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)) or 0)
    head_dim = int(getattr(cfg, "head_dim", 0) or (d // heads if heads else 0))
    kv = int(getattr(cfg, "num_key_value_heads", heads) or heads)
    return head_counts(model), head_dim, max(1, heads // max(1, kv))


def flops_cost(loaded: Loaded, seq_len: int = 128) -> CostModel:
    """Exact FLOPs per token, split into what a neuron, a head and the rest cost."""
    from .counts import flops_per_token

    model = loaded.model
    base = base_model(model)
    cfg = base.config
    d = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    per_neuron = []
    for site in ffn_sites(model):
        per_neuron.append(2.0 * (len(site.up) * d + d))
    units, head_dim, q_per_unit = _attention_shape(model)
    kv_share = 1.0 / q_per_unit
    # a unit: its query heads' q rows and o columns, plus one k and one v head; scores and weighted sum
    per_head = [2.0 * d * head_dim * (2 * q_per_unit + 2) + 4.0 * seq_len * head_dim * q_per_unit] * len(units)
    neurons = ffn_widths(model)
    total = float(flops_per_token(model, seq_len))
    removable = sum(a * n for a, n in zip(per_neuron, neurons)) + sum(a * h for a, h in zip(per_head, units))
    return CostModel("flops", max(0.0, total - removable), per_neuron, per_head, neurons, units,
                     {"seq_len": seq_len, "kv_share": kv_share})


def _has_bias(base: nn.Module, paths) -> int:
    return sum(getattr(get_module(base, p), "bias", None) is not None for p in paths)


def params_cost(loaded: Loaded) -> CostModel:
    """Parameters, split into what a neuron, a head unit and the rest hold (see the module doc)."""
    from .counts import count_params

    model = loaded.model
    base = base_model(model)
    cfg = base.config
    d = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    per_neuron = [float(len(s.up) * d + d + _has_bias(base, s.up)) for s in ffn_sites(model)]
    units, head_dim, q_per_unit = _attention_shape(model)
    per_head = [float(d * head_dim * (2 * q_per_unit + 2) + (head_dim * (q_per_unit + 2) if _has_bias(base, (s.q,)) else 0))
                for s in attention_sites(model)]
    neurons = ffn_widths(model)
    total = float(count_params(model))
    removable = sum(a * n for a, n in zip(per_neuron, neurons)) + sum(a * h for a, h in zip(per_head, units))
    return CostModel("params", max(0.0, total - removable), per_neuron, per_head, neurons, units,
                     {"total": total})


HELD_BACK = ((0.75, 0.75), (0.4, 0.5))  # (FFN, head) fractions timed beside the fitted shapes but not fitted
HELD_BACK_WARN = 0.1                    # a larger prediction error on them is logged as a warning
STUB_LAYERS = 2                         # a model of at least 2 x this many blocks: the per-unit costs are timed on
                                        # its first STUB_LAYERS blocks, the base on the whole dense model


def _stub(model: nn.Module, layers: int) -> nn.Module:
    """A copy of `model` with only its first `layers` blocks (the others are not copied)."""
    fam = family_of(model)
    base = base_model(model)
    blocks = get_module(base, fam.layers)
    kept = nn.ModuleList(list(blocks)[:layers])
    set_module(base, fam.layers, nn.ModuleList())          # the copy leaves the other blocks behind
    try:
        stub = copy.deepcopy(model)
    finally:
        set_module(base, fam.layers, blocks)
    set_module(base_model(stub), fam.layers, copy.deepcopy(kept))
    return stub


def _pruned_copy(model: nn.Module, neurons: list[int], units: list[int], f_ffn: float, f_heads: float
                 ) -> tuple[nn.Module, int, int]:
    """A physically pruned copy keeping the first f_ffn of every FFN and f_heads of every attention's units
    (at least one each), with the neurons and head units it keeps in all."""
    m = model
    keep_n = [max(1, int(round(f_ffn * w))) for w in neurons]
    keep_h = [max(1, int(round(f_heads * u))) for u in units]
    if f_ffn < 1.0:
        m = keep_ffn_neurons(copy.deepcopy(m), [range(k) for k in keep_n])
    if f_heads < 1.0:
        m = keep_heads(copy.deepcopy(m) if m is model else m, [range(k) for k in keep_h])
    return m, sum(keep_n) if f_ffn < 1.0 else sum(neurons), sum(keep_h) if f_heads < 1.0 else sum(units)


def fit_latency(shapes: Sequence[tuple[int, int]], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Least squares of seconds = base + a_n x neurons + a_h x heads over (neurons, heads) shapes; a_h = 0
    where the heads never vary. Returns (base, a_n, a_h)."""
    x = np.array([[1.0, n, h] for n, h in shapes])
    if len({(n, h) for n, h in shapes}) < 2:
        raise UserError("the latency fit needs at least one pruned shape; give fractions below 1")
    cols = [0, 1, 2] if len({h for _n, h in shapes}) > 1 else [0, 1]
    coef, *_ = np.linalg.lstsq(x[:, cols], np.asarray(seconds, dtype=float), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2]) if len(cols) == 3 else 0.0


@torch.no_grad()
def latency_cost(loaded: Loaded, batch_size: int = 32, seq_len: int = 128, repeats: int = 5,
                 fractions: Sequence[float] = (1.0, 0.5, 0.25), seed: int = 0) -> CostModel:
    """Fit time = base + a_ffn * neurons + a_head * heads to the median times of the model's own shapes on its
    device (the dense model, copies with the FFNs or the attention at the given fractions), timed interleaved
    with shapes held back from the fit (HELD_BACK, both kinds pruned at once), whose prediction error it reports.
    A model of at least 2 x STUB_LAYERS blocks has its shapes timed on a copy of its first STUB_LAYERS blocks (the
    per-unit costs do not depend on the depth; a fraction of the time), and its base is the whole dense model's
    time, timed in the same rounds, less what its units cost."""
    full = loaded.model.eval()
    if seq_len > loaded.max_positions:
        raise UserError(f"length {seq_len} exceeds the model's {loaded.max_positions} positions")
    vocab = int(base_model(full).get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, batch_size, seq_len, loaded.device, seed)
    full_neurons, (full_units, _hd, _q) = ffn_widths(full), _attention_shape(full)
    model = _stub(full, STUB_LAYERS) if len(full_neurons) >= 2 * STUB_LAYERS else full
    if model is not full:
        try:
            forward_fn(model, inputs)()
        except Exception as exc:  # noqa: BLE001 - a family whose forward needs every block: time the whole model
            log.info("timing the whole model (a %d-block copy did not run: %s)", STUB_LAYERS, exc)
            model = full
    neurons = ffn_widths(model)
    units, _hd, _q = _attention_shape(model)
    heads_prunable = all(u > 1 for u in units)
    variants: dict[str, tuple[nn.Module, int, int]] = {"dense": (model, sum(neurons), sum(units))}
    for f in (f for f in fractions if f < 1.0):
        variants[f"ffn{f:g}"] = _pruned_copy(model, neurons, units, f, 1.0)
        if heads_prunable:
            variants[f"heads{f:g}"] = _pruned_copy(model, neurons, units, 1.0, f)
    fitted = list(variants)
    for f_n, f_h in HELD_BACK:
        f_h = f_h if heads_prunable else 1.0
        variants[f"held_ffn{f_n:g}_heads{f_h:g}"] = _pruned_copy(model, neurons, units, f_n, f_h)
    fns = {k: forward_fn(m, inputs) for k, (m, _n, _h) in variants.items()}
    if model is not full:
        fns["whole"] = forward_fn(full, inputs)
    timings = time_interleaved(fns, warmup=1, repeats=repeats, device=loaded.device)
    c0, a_n, a_h = fit_latency([variants[k][1:] for k in fitted], [timings[k].median for k in fitted])
    a_n, a_h = max(a_n, 0.0), max(a_h, 0.0)
    stub_base = max(0.0, c0)
    if model is not full:    # the whole dense model's time, less what its units cost, is its base
        c0 = timings["whole"].median - a_n * sum(full_neurons) - a_h * sum(full_units)
    n_layers = len(full_neurons)
    cm = CostModel("latency", max(0.0, c0), [a_n] * n_layers, [a_h] * n_layers, full_neurons, full_units)
    timed = {}
    for k, (_m, n, h) in variants.items():
        t, pred = timings[k], stub_base + a_n * n + a_h * h
        timed[k] = {"neurons": int(n), "heads": int(h), "median_s": t.median, "q1_s": t.q1, "q3_s": t.q3,
                    "predicted_s": pred, "rel_error": (pred - t.median) / t.median, "fitted": k in fitted}
    if model is not full:
        timed["whole"] = {"neurons": sum(full_neurons), "heads": sum(full_units), "median_s": timings["whole"].median,
                          "q1_s": timings["whole"].q1, "q3_s": timings["whole"].q3}
    cm.info = {"batch_size": batch_size, "seq_len": seq_len, "repeats": repeats, "device": str(loaded.device),
               "model": model_signature(loaded), "timed_blocks": len(neurons),
               "timed": timed, "heads_fitted": heads_prunable and any(f < 1.0 for f in fractions),
               "max_rel_residual": max(abs(t["rel_error"]) for t in timed.values() if t.get("fitted")),
               "held_back_max_rel_error": max(abs(t["rel_error"]) for t in timed.values() if t.get("fitted") is False),
               "machine": machine_info()}
    log.info("latency cost model: base %.4f s, %.2e s per neuron, %.2e s per head; max residual %.1f%%, "
             "held-back shapes predicted within %.1f%%", cm.base, a_n, a_h, 100 * cm.info["max_rel_residual"],
             100 * cm.info["held_back_max_rel_error"])
    if cm.info["held_back_max_rel_error"] > HELD_BACK_WARN:
        log.warning("the latency fit is off by %.0f%% on shapes it was not fitted on: a target may be missed "
                    "(a busy machine, or costs that do not scale linearly with width)",
                    100 * cm.info["held_back_max_rel_error"])
    return cm
