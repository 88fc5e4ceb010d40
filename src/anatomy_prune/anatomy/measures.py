"""Anatomy of layers and FFN neurons (the first paper's sections 3.1-3.3).

Layer similarity: cosine between the readout token (CLS, or the last real token) at every layer
(0 = embeddings ... L = last block) and the readout token of the last layer.
Neuron similarity: cosine between each FFN neuron's output vector (what it adds to the residual stream per
unit of activation: a column of the down projection) and the last layer's readout token for that input.
Neuron sets: per input and layer, the neurons whose similarity is above a threshold (the paper: 0.35).
Randomness: how much the sets of different inputs overlap (pairwise Jaccard) and what fraction of a layer's
neurons is above the threshold (the paper: under 5%).

`compute_anatomy` does all of it in memory; the anatomy job (`pipeline.anatomy`) writes it to a run folder
and draws the figures from the saved files, so they can be redrawn without the model.

Note on decoders: transformers' `hidden_states[-1]` of GPT-2 and Llama is the last block's output *after*
the final norm (ln_f / norm), while the other entries are before any norm. The decoder's "jump at the last
layer" therefore mixes the last block with the final norm; `run_anatomy` records the pre-norm state too
(`prenorm_similarity`) so the two can be told apart.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.batches import batches, to_device
from ..errors import UserError
from ..hooks import final_norm_name, run_with_hooks
from ..models.families import base_model, ffn_sites, ffn_widths, gather_readout, neuron_output_vectors, readout_index
from ..models.loading import Loaded, max_length_for
from ..progress import tqdm

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.35   # the paper's "high cosine similarity"
PAPER_FRACTION = 0.05      # the paper: under 5% of a layer's neurons are above the threshold
OUTLIER_DIMS = 2  # final_state_report: how many of the target's largest dimensions to report and zero
JACCARD_MATRICES_UP_TO = 32  # summary.json keeps the full [n, n] Jaccard matrices only for this many inputs


# --- core measures (signatures used by the pruning strategy: keep them stable) ------------------

@torch.no_grad()
def readout_states(loaded: Loaded, texts: Sequence[str], max_length: int = 128, batch_size: int = 16) -> Tensor:
    """The readout token's hidden state after the embeddings and after every block: [n_inputs, L+1, d_model]."""
    return readout_pass(loaded, texts, max_length, batch_size)[0]


def layer_similarity(states: Tensor) -> Tensor:
    """Cosine of each layer's readout state with the last layer's: [n_inputs, L+1] (last column is 1)."""
    return F.cosine_similarity(states, states[:, -1:, :].expand_as(states), dim=-1)


@torch.no_grad()
def neuron_similarity(loaded: Loaded, final: Tensor) -> list[Tensor]:
    """Per layer, cosine of every neuron's output vector with each input's final readout state.

    final: [n_inputs, d_model] -> list over layers of [n_inputs, d_ff].
    """
    sims = []
    for site in ffn_sites(loaded.model):
        vecs = neuron_output_vectors(loaded.model, site).detach().float().cpu()  # [d_ff, d_model]
        sims.append(F.normalize(final.float(), dim=-1) @ F.normalize(vecs, dim=-1).t())
    return sims


# --- forward pass with the pre-norm last state ---------------------------------------------------

@torch.no_grad()
def readout_pass(loaded: Loaded, texts: Sequence[str], max_length: int = 128, batch_size: int = 16,
                 progress: bool = False) -> tuple[Tensor, Tensor | None]:
    """Readout states [n_inputs, L+1, d_model] and, for models with a final norm, the last block's readout
    state before that norm [n_inputs, d_model] (else None). One forward pass per batch."""
    base = base_model(loaded.model)
    norm = final_norm_name(loaded.model)
    states, pre = [], []
    n_batches = math.ceil(len(texts) / batch_size) if batch_size > 0 else 0
    for b in tqdm(batches(loaded.tokenizer, texts, batch_size, max_length), total=n_batches, desc="anatomy",
                  disable=not progress or n_batches < 3):
        b = to_device(b, loaded.device)
        idx = readout_index(loaded.family, b["attention_mask"])  # [batch]
        seen: list[Tensor] = []
        with run_with_hooks(loaded.model, {"final_norm.input": lambda x, _p: seen.append(x.detach())} if norm else {}), \
                loaded.autocast():
            hidden = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          output_hidden_states=True).hidden_states  # L+1 x [batch, pos, d]
        states.append(torch.stack([gather_readout(h, idx) for h in hidden], dim=1).float().cpu())
        if norm:
            pre.append(gather_readout(seen[-1], idx).float().cpu())  # [batch, d]
    if not states:
        raise UserError("no inputs to analyse; give at least one text")
    return torch.cat(states), (torch.cat(pre) if norm else None)


# --- neuron sets and their overlap ---------------------------------------------------------------

def check_threshold(threshold: float) -> float:
    """A cosine threshold must be a number in [-1, 1]."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UserError(f"--threshold must be a number in [-1, 1], got {threshold!r}") from None
    if not (-1.0 <= t <= 1.0):  # also false for NaN
        raise UserError(f"--threshold must be in [-1, 1] (it is a cosine similarity), got {threshold}")
    return t


def neurons_above(sims: Sequence[Tensor | np.ndarray], threshold: float = DEFAULT_THRESHOLD) -> list[list[list[int]]]:
    """Ids of the neurons with similarity strictly above `threshold`: [input][layer] -> sorted ids.

    sims: per layer [n_inputs, d_ff] (widths may differ by layer, as in a pruned model).
    """
    arrays = [np.asarray(s) for s in sims]
    n_inputs = arrays[0].shape[0] if arrays else 0
    return [[np.flatnonzero(a[k] > threshold).tolist() for a in arrays] for k in range(n_inputs)]


def jaccard(a: set[int] | Sequence[int], b: set[int] | Sequence[int]) -> float:
    """|a & b| / |a | b|; NaN when both are empty (nothing to compare, so it counts as neither same nor different)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


def jaccard_matrices(neuron_sets: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
    """Per layer, the pairwise Jaccard matrix of the inputs' neuron sets: list over layers of [n, n]
    (NaN where both sets are empty, the diagonal included)."""
    n = len(neuron_sets)
    n_layers = len(neuron_sets[0]) if n else 0
    out = []
    for layer in range(n_layers):
        ids = sorted(set().union(*(neuron_sets[k][layer] for k in range(n))))
        col = {j: c for c, j in enumerate(ids)}
        member = np.zeros((n, len(ids)), dtype=np.float64)  # [n, union]
        for k in range(n):
            member[k, [col[j] for j in neuron_sets[k][layer]]] = 1.0
        inter = member @ member.T  # [n, n]
        size = member.sum(axis=1)
        union = size[:, None] + size[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(union > 0, inter / np.maximum(union, 1), np.nan))
    return out


def _stats(x: np.ndarray, axis: int = 0) -> dict[str, list[float]]:
    """mean, std, min, 10/50/90th percentile and max along `axis`, NaNs ignored (None where all NaN)."""
    x = np.asarray(x, dtype=float)
    out = {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns: reported as None
        for key, fn in (("mean", np.nanmean), ("std", np.nanstd), ("min", np.nanmin), ("max", np.nanmax)):
            out[key] = fn(x, axis=axis)
        for q in (10, 50, 90):
            out[f"q{q}"] = np.nanpercentile(x, q, axis=axis)
    return {k: [None if not np.isfinite(v) else round(float(v), 6) for v in np.atleast_1d(a)] for k, a in out.items()}


def randomness(neuron_sets: Sequence[Sequence[Sequence[int]]], widths: Sequence[int]) -> dict:
    """The paper's "randomness" finding, measured per layer over inputs.

    fraction_above: share of the layer's neurons above the threshold (stats over inputs);
    jaccard: pairwise overlap of the inputs' sets (stats over pairs; pairs where both sets are empty are left
    out and counted in jaccard_both_empty); union / core: neurons above for at least one / for every input.
    """
    n = len(neuron_sets)
    n_layers = len(widths)
    counts = np.array([[len(neuron_sets[k][i]) for i in range(n_layers)] for k in range(n)], dtype=float)  # [n, L]
    frac = counts / np.asarray(widths, dtype=float)[None, :]
    mats = jaccard_matrices(neuron_sets)
    iu = np.triu_indices(n, k=1)
    pairs = np.stack([m[iu] for m in mats], axis=1) if n > 1 else np.full((0, n_layers), np.nan)  # [pairs, L]
    union = [sorted(set().union(*(neuron_sets[k][i] for k in range(n)))) for i in range(n_layers)]
    core = [sorted(set.intersection(*(set(neuron_sets[k][i]) for k in range(n)))) if n else [] for i in range(n_layers)]
    out = {
        "count_above": _stats(counts),
        "fraction_above": _stats(frac),
        "jaccard": _stats(pairs),
        "jaccard_pairs": int(pairs.shape[0]),
        "jaccard_both_empty": [int(v) for v in np.isnan(pairs).sum(axis=0)] if n > 1 else [0] * n_layers,
        "union_size": [len(u) for u in union],
        "core_size": [len(c) for c in core],
        "core": core,
        "layers_over_paper_fraction": [i for i in range(n_layers) if frac[:, i].mean() > PAPER_FRACTION],
        "mean_fraction_above": round(float(frac.mean()), 6) if frac.size else None,
        "mean_jaccard": _nan_round(np.nanmean(pairs)) if np.isfinite(pairs).any() else None,
    }
    if n <= JACCARD_MATRICES_UP_TO:
        out["jaccard_matrices"] = [[[None if np.isnan(v) else round(float(v), 4) for v in row] for row in m]
                                   for m in mats]
    return out


def _nan_round(v: float, nd: int = 6) -> float | None:
    return None if not np.isfinite(v) else round(float(v), nd)


def final_state_report(loaded: Loaded, final: Tensor, threshold: float, top: int = OUTLIER_DIMS) -> dict:
    """How alike the inputs' final readout states are, and how much of them is a few large dimensions.

    final: [n_inputs, d_model]. Reports the pairwise cosine of the inputs' targets, the `top` dimensions with
    the largest mean |value| and their share of the squared norm, and the share of each layer's neurons above
    the threshold once those dimensions are zeroed in the target: when that share collapses, the neuron sets
    are decided by the shared outlier dimensions rather than by the input.
    """
    n = final.shape[0]
    unit = F.normalize(final.float(), dim=-1)
    cos = (unit @ unit.t()).numpy()  # [n, n]
    pairs = cos[np.triu_indices(n, k=1)]
    mag = final.abs().mean(dim=0)  # [d]
    dims = mag.topk(min(top, final.shape[1])).indices
    share = (final[:, dims].pow(2).sum(dim=1) / final.pow(2).sum(dim=1).clamp_min(1e-12)).numpy()  # [n]
    keep = torch.ones(final.shape[1])
    keep[dims] = 0
    without = neuron_similarity(loaded, final * keep)  # L x [n, d_ff]
    return {
        "pairwise_cosine": _stats(pairs[:, None])["mean"][0] if n > 1 else None,
        "top_dims": dims.tolist(),
        "top_dims_mean_abs": [round(float(mag[d]), 4) for d in dims],
        "mean_abs": round(float(mag.mean()), 4),
        "top_dims_energy_share": _stats(share[:, None])["mean"][0],
        "fraction_above_without_top_dims": [round(float((w > threshold).float().mean()), 6) for w in without],
    }


# --- inputs ---------------------------------------------------------------------------------------

def count_truncated(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Indices of the inputs whose tokens (special tokens included) do not fit in max_length."""
    ids = tokenizer(list(texts), truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    return [i for i, t in enumerate(ids) if len(t) > max_length]


def _check_inputs(texts: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if len(texts) == 0:
        raise UserError("no inputs to analyse; give --inputs probes, imdb:N or a text file with one input per line")
    if any(not str(t).strip() for t in texts):
        raise UserError("an input is empty; every input needs some text")
    if names is None:
        return [f"input {i}" for i in range(len(texts))]
    if len(names) != len(texts):
        raise ValueError(f"{len(names)} names for {len(texts)} inputs")
    return list(names)


# --- the whole anatomy, in memory ------------------------------------------------------------------

def _layer_doc(loaded: Loaded, inputs: tuple, states: Tensor, pre: Tensor | None, layer: Tensor,
               reading: tuple) -> dict:
    """layer_similarity.json: the curve per input, and (with a final norm) the same against the pre-norm state."""
    (texts, names), (max_length, side, truncated) = inputs, reading
    doc = {
        "model": loaded.spec, "base_model": loaded.base_spec, "kind": loaded.kind, "family": loaded.family.name,
        "readout": loaded.family.readout, "n_layers": len(ffn_widths(loaded.model)), "max_length": max_length,
        "truncation_side": side, "truncated": truncated, "names": names, "inputs": list(texts),
        "similarity": layer.tolist(),
        "final_norm": final_norm_name(loaded.model),
    }
    if pre is not None:
        # the same curve against the last block's state before the final norm, and what the norm alone does
        target = pre[:, None, :].expand_as(states)
        pre_curve = F.cosine_similarity(states, target, dim=-1)
        pre_curve[:, -1] = 1.0
        doc["prenorm_similarity"] = pre_curve.tolist()
        doc["final_norm_similarity"] = F.cosine_similarity(pre, states[:, -1], dim=-1).tolist()
    return doc


def _summary(loaded: Loaded, layer_doc: dict, layer: Tensor, sims: list[Tensor], sets: list, final: Tensor,
             threshold: float) -> dict:
    """summary.json's statistics over inputs: layer similarity, neuron sets' randomness, the final state."""
    widths = ffn_widths(loaded.model)
    lay = layer.numpy()
    neuron_max = np.stack([s.max(dim=1).values.numpy() for s in sims], axis=1)  # [n, L]
    abs_frac = np.stack([(s.abs() > abs(threshold)).float().mean(dim=1).numpy() for s in sims], axis=1)  # [n, L]
    return {
        "model": loaded.spec, "kind": loaded.kind, "family": loaded.family.name, "threshold": threshold,
        "n_inputs": len(layer_doc["inputs"]), "n_layers": len(widths), "d_ff": widths,
        "max_length": layer_doc["max_length"], "n_truncated": len(layer_doc["truncated"]),
        "layer_similarity": _stats(lay),
        "neurons": randomness(sets, widths),
        "max_neuron_similarity": _stats(neuron_max),
        "fraction_abs_above": _stats(abs_frac),
        "final_state": final_state_report(loaded, final, threshold),
    }


def compute_anatomy(loaded: Loaded, texts: Sequence[str], names: Sequence[str] | None = None,
                    threshold: float = DEFAULT_THRESHOLD, max_length: int = 128, batch_size: int = 16,
                    progress: bool = True) -> dict:
    """Everything the anatomy job writes, in memory: {"layer": ..., "sims": [per layer [n, d_ff]], "neurons": ...,
    "summary": ...}. Raises UserError on bad input before any forward pass."""
    threshold = check_threshold(threshold)
    names = _check_inputs(texts, names)
    max_length = max_length_for(loaded, max_length)
    truncated = count_truncated(loaded.tokenizer, texts, max_length)
    side = getattr(loaded.tokenizer, "truncation_side", "right")
    if truncated:
        log.warning("%d of %d inputs are longer than %d tokens and were truncated (keeping their %s)",
                    len(truncated), len(texts), max_length, "end" if side == "left" else "start")

    t0 = time.perf_counter()
    states, pre = readout_pass(loaded, texts, max_length, batch_size, progress)  # [n, L+1, d], [n, d] | None
    layer = layer_similarity(states)  # [n, L+1]
    sims = neuron_similarity(loaded, states[:, -1])  # L x [n, d_ff]
    forward_s = time.perf_counter() - t0
    sets = neurons_above(sims, threshold)  # [input][layer] -> ids
    widths = ffn_widths(loaded.model)

    layer_doc = _layer_doc(loaded, (texts, names), states, pre, layer, (max_length, side, truncated))
    neurons_doc = {
        "model": loaded.spec, "threshold": threshold, "names": names, "d_ff": widths,
        "neurons": sets,
        "similarity": [[[round(float(sims[i][k, j]), 4) for j in sets[k][i]] for i in range(len(widths))]
                       for k in range(len(texts))],
    }
    summary = _summary(loaded, layer_doc, layer, sims, sets, states[:, -1], threshold)
    summary["forward_s"] = round(forward_s, 3)
    summary["device"] = str(loaded.device)
    if pre is not None:
        summary["prenorm_layer_similarity"] = _stats(np.asarray(layer_doc["prenorm_similarity"]))
        summary["final_norm_similarity"] = _stats(np.asarray(layer_doc["final_norm_similarity"]))
    return {"layer": layer_doc, "sims": sims, "neurons": neurons_doc, "summary": summary}


def format_neuron_sets(neurons_doc: dict, inputs: Sequence[int] | None = None) -> str:
    """neurons.json as the paper's Figures 2a / 3a list it: per input, per layer, the ids above threshold."""
    lines = []
    for i in (inputs if inputs is not None else range(len(neurons_doc["neurons"]))):
        name = neurons_doc["names"][i] if neurons_doc.get("names") else str(i)
        lines.append(f"===== Input {name} =====")
        for layer, ids in enumerate(neurons_doc["neurons"][i]):
            lines.append(f"Layer {layer}, neurons: {list(ids)}")
    return "\n".join(lines)
