"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers", reimplemented from the paper as
a peer (issue 25, item 5) on this library's pieces: no retraining, a FLOPs constraint, heads and FFN neurons.

1. Importance: the empirical Fisher information of a mask of ones on every head and every FFN neuron, summed
   over the calibration reviews' per-review gradients of the task loss (labels used, as in the paper).
2. Mask search under the FLOPs constraint: heads and neurons each ranked over the whole model by their Fisher
   diagonal; for every number of kept heads n, the neurons that fit the remaining FLOPs are the top ones; the
   n whose kept units have the largest total importance wins (layers may lose every head).
3. Mask rearrangement: within each layer the counts stay, the units are chosen again by the layer's full
   Fisher matrix (the paper's greedy: start from the lowest-importance set, add the next unit in importance
   order, and bring back the one whose return leaves the smallest || sum of the removed units' gradients ||^2).
4. Mask tuning: block after block, each kept head's and neuron's mask value is refitted by least squares so
   that the pruned block's sublayer output (the input of the norm after it) matches the dense model's on the
   dense model's own inputs, given the pruned model's inputs; heads with a free constant (dropped after the
   solve) and not in the first block, the last block's neurons on the readout token only; solved with LSMR for
   the change from 1, damped by 1, as the paper's code does; the tuning stops at the first layer whose solve
   fails or gives a scale outside [-10, 10]. The scales are folded into the output projections' columns of the
   physically smaller model.

What differs from the paper, by design: the Fisher sums per-review gradients (the paper's definition; its code
sums per mini-batch); the calibration reviews are the peers' own (128, not 2,048); the FLOPs counted are ours
(evaluate.cost.flops_cost), so a FLOPs target means the same here as `prune --target-flops`. Its latency-table
search is not reimplemented: a FLOPs plan is timed like every other point.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from anatomy_prune.apply.modes import apply_plan
from anatomy_prune.apply.tune import _Capture, _dense_pass
from anatomy_prune.evaluate.cost import flops_cost
from anatomy_prune.models.families import (attention_sites, base_model, family_of, ffn_sites, ffn_widths, get_module,
                                           readout_index, weight_out_in)
from anatomy_prune.pipeline.step import copy_loaded
from anatomy_prune.plan.plan import PruningPlan
from anatomy_prune.scores.accumulators import FFN, HEADS, MaskGradients
from anatomy_prune.scores.calibration import _frozen, _loss
from anatomy_prune.scores.layerwise import block_inputs, blocks_of, run_block

SCALE_LIMIT = 10.0      # the paper's bound on a tuned mask value; outside it the tuning stops
LSMR_DAMP = 1.0         # the damping of the paper's LSMR solve (on the change of a mask value from 1)


def fisher_matrices(calib) -> dict:
    """Per layer, the Fisher matrix over examples of the masks on FFN neurons and on head units: sum over
    calibration reviews of g g^T, g the review's loss gradient w.r.t. the layer's masks (float64).
    {"neurons": [per layer], "heads": [per layer], "seconds": what computing them took}."""
    t0 = time.perf_counter()
    model = calib.loaded.model
    acc = {"neurons": MaskGradients(model, FFN), "heads": MaskGradients(model, HEADS)}
    out: dict = {k: [None] * len(a.masks) for k, a in acc.items()}
    with _frozen(model):
        for batch in calib.batches(with_labels=True):
            with torch.enable_grad(), acc["neurons"].masked(), acc["heads"].masked():
                _loss(calib.loaded, batch).backward()
            for kind, a in acc.items():
                for layer, ms in enumerate(a.masks):
                    g = torch.cat([m.grad.reshape(m.shape[0], -1) for m in ms]).double()    # [reviews, units]
                    out[kind][layer] = g.T @ g + (0 if out[kind][layer] is None else out[kind][layer])
                    ms.clear()
    return {**out, "seconds": time.perf_counter() - t0}


def search_flops(head_fisher: list, neuron_fisher: list, cost, flops: float) -> tuple[list, list]:
    """Kwon's search: per layer, the kept head and neuron ids under `flops` x the dense FLOPs per token."""
    per_head, per_neuron = float(cost.per_head[0]), float(cost.per_neuron[0])
    if any(abs(a - per_head) > 1e-6 * per_head for a in cost.per_head) or \
            any(abs(a - per_neuron) > 1e-6 * per_neuron for a in cost.per_neuron):
        raise ValueError("Kwon's search assumes every layer's head and neuron cost the same")
    budget = flops * cost.dense - cost.base
    hs = torch.cat([f.diagonal() for f in head_fisher])
    ns = torch.cat([f.diagonal() for f in neuron_fisher])
    h_val, h_idx = hs.sort(descending=True)
    n_val, n_idx = ns.sort(descending=True)
    h_cum, n_cum = h_val.cumsum(0), n_val.cumsum(0)
    best = (-1.0, 0, 0)
    for n_heads in range(1, len(hs) + 1):
        n_neurons = min(len(ns), int((budget - n_heads * per_head) // per_neuron))
        if n_neurons < 0:
            break
        total = float(h_cum[n_heads - 1]) + (float(n_cum[n_neurons - 1]) if n_neurons else 0.0)
        if total > best[0]:
            best = (total, n_heads, n_neurons)
    if best[0] < 0:
        raise ValueError(f"a FLOPs fraction of {flops} leaves no room for one head")
    return _per_layer(h_idx[:best[1]], [f.shape[0] for f in head_fisher]), \
        _per_layer(n_idx[:best[2]], [f.shape[0] for f in neuron_fisher])


def _per_layer(flat_ids, widths: list[int]) -> list[list[int]]:
    starts = [sum(widths[:i]) for i in range(len(widths))]
    out: list[list[int]] = [[] for _ in widths]
    for i in sorted(int(x) for x in flat_ids):
        layer = max(j for j, s in enumerate(starts) if s <= i)
        out[layer].append(i - starts[layer])
    return out


def rearrange(fisher: torch.Tensor, keep: list[int]) -> list[int]:
    """Kwon's greedy mask rearrangement within one layer (its Fisher matrix F = sum_r g_r g_r^T): the removed
    set starts as the units of lowest F_ii; each unit after them in that order joins it, and the member whose
    return leaves the smallest 1_S^T F 1_S goes back. The count of kept units stays."""
    n, n_keep = fisher.shape[0], len(keep)
    n_gone = n - n_keep
    if n_keep == 0 or n_gone == 0:
        return list(keep)
    order = fisher.diagonal().argsort().tolist()          # ascending importance
    gone = torch.zeros(n, dtype=torch.bool)
    gone[order[:n_gone]] = True
    row = fisher[:, gone].sum(1)                          # F 1_S for every unit
    for a in order[n_gone:]:
        gone[a] = True
        row += fisher[:, a]
        # 1_{S-r}^T F 1_{S-r} = const - 2 (F 1_S)_r + F_rr: bring back the r that minimizes it
        r = int(torch.argmin((fisher.diagonal() - 2 * row).masked_fill(~gone, float("inf"))))
        gone[r] = False
        row -= fisher[:, r]
    return [i for i in range(n) if not gone[i]]


def _lsmr(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """The normal equations gram x = rhs solved as the paper's code does: LSMR for the change from 1
    (gram d = rhs - gram 1) with damping LSMR_DAMP, so a poorly determined scale stays near 1; None where LSMR stops
    without a least-squares solution (its istop >= 3)."""
    from scipy.sparse.linalg import lsmr

    d, istop = lsmr(gram.numpy(), (rhs - gram.sum(1)).numpy(), damp=LSMR_DAMP, atol=1e-10, btol=1e-10,
                      maxiter=100 * gram.shape[0])[:2]
    x = 1.0 + torch.from_numpy(d)
    return x if istop < 3 and torch.isfinite(x).all() else None


@torch.no_grad()
def tune_masks(pruned, dense, calib) -> dict:
    """Kwon's mask tuning on the physically pruned `pruned` (in place): per block, each kept head's, then each
    kept neuron's output scaled by its least-squares mask value (see the module doc). Returns a report."""
    model = pruned.model
    model.eval()
    dense.model.eval()
    base = base_model(model)
    batches, hidden = block_inputs(pruned, calib.for_model(pruned))
    dense_hidden = list(hidden)
    last = len(blocks_of(model)) - 1
    fam = family_of(model)
    readout = [dataclasses.replace(b, mask=torch.zeros_like(b.mask).scatter_(1, readout_index(fam, b.mask)[:, None],
                                                                              True)) for b in batches]
    report = {"tuned": [], "stopped_at": None}
    atts, ffns, widths = attention_sites(model), ffn_sites(model), ffn_widths(model)
    for i, (block, dblock) in enumerate(zip(blocks_of(model), blocks_of(dense.model))):
        att, ffn = atts[i], ffns[i]
        streams, next_dense = _dense_pass(dense, dblock, [att.o, ffn.down], batches, dense_hidden)
        sites = []
        if i > 0 and att.n_units > 0:
            sites.append(("heads", att.o, att.head_dim * att.group, batches, streams[0]))
        if widths[i] > 0:
            if i == last:      # the readout token only, as the classifier reads it
                streams_r = _dense_pass(dense, dblock, [ffn.down], readout, dense_hidden)[0][0]
                sites.append(("neurons", ffn.down, 1, readout, streams_r))
            else:
                sites.append(("neurons", ffn.down, 1, batches, streams[1]))
        for kind, path, group, bs, target_s in sites:
            proj = get_module(base, path)
            scales = _solve(pruned, block, proj, group, bs, hidden, target_s, with_constant=kind == "heads")
            if scales is None or float(scales.abs().max()) > SCALE_LIMIT:
                report["stopped_at"] = {"layer": i, "kind": kind,
                                        "max_abs_scale": None if scales is None else float(scales.abs().max())}
                return report
            w = weight_out_in(proj)                                            # [d_out, k]
            w.mul_(scales.repeat_interleave(group).to(w.dtype)[None, :])
            report["tuned"].append({"layer": i, "kind": kind, "mean_scale": float(scales.mean()),
                                    "max_abs_scale": float(scales.abs().max())})
        dense_hidden = next_dense
        hidden = run_block(pruned, block, batches, hidden)
    return report


def _solve(pruned, block, proj, group: int, batches, hidden, dense_s, with_constant: bool):
    """Least-squares mask values of `proj`'s input units (groups of `group` features): min || sum_u m_u
    W_u h_u (+ c) - (s_dense - x_pruned - bias) ||^2 over the captured rows. None if LSMR fails."""
    w = weight_out_in(proj).detach().float()                                   # [d_out, k]
    k = w.shape[1]
    units = k // group
    bias = getattr(proj, "bias", None)
    cap = _Capture(block, [proj])
    n_var = units + with_constant
    gram = torch.zeros(n_var, n_var, dtype=torch.float64)
    rhs = torch.zeros(n_var, dtype=torch.float64)
    ww = (w.T @ w).double() if group == 1 else None                            # neurons: (w_u . w_v)
    for b, x, s_dense in zip(batches, hidden, dense_s):
        got = cap.run(pruned, b, x)[0][0]
        h, o, s = got["h"], got["o"], got["s"]
        target = s_dense - (s - o) - (bias.detach().float() if bias is not None else 0.0)   # [n, d_out]
        if group == 1:
            hd = h.double()
            g, c = ww * (hd.T @ hd), (hd * (target.double() @ w.double())).sum(0)
            cols = None
        else:          # per head its contribution [units, n, d_out]
            p = torch.einsum("nuk,duk->und", h.view(len(h), units, group), w.view(-1, units, group)).double()
            flat = p.reshape(units, -1)
            g, c = flat @ flat.T, flat @ target.double().reshape(-1)
            cols = flat.sum(1)
        if with_constant:
            g = torch.cat([torch.cat([g, cols[:, None]], 1),
                           torch.cat([cols, torch.tensor([float(target.numel())], dtype=torch.float64)])[None]], 0)
            c = torch.cat([c, target.double().sum()[None]])
        gram += g
        rhs += c
    x = _lsmr(gram, rhs)
    return None if x is None else x[:units]


def prune_with_kwon(clf, calib, flops: float, fisher: dict | None = None, seq_len: int = 128, tune: bool = True
                    ) -> dict:
    """The dense classifier `clf` pruned to `flops` x its FLOPs per token at `seq_len` as Kwon et al. do
    (search, rearrangement, mask tuning), on `calib`'s reviews: {"loaded": a new, physically smaller Loaded,
    "plan", "seconds", ...}. `fisher` (fisher_matrices' result) may be shared between targets; each target is
    charged its seconds. `tune=False`: the paper's ablation without mask tuning."""
    t0 = time.perf_counter()
    shared = fisher is not None                  # then its seconds are charged here; else the clock counts them
    fisher = fisher if shared else fisher_matrices(calib)
    found = search_flops(fisher["heads"], fisher["neurons"], flops_cost(clf, seq_len=seq_len), flops)
    heads = [rearrange(f, k) for f, k in zip(fisher["heads"], found[0])]
    neurons = [rearrange(f, k) for f, k in zip(fisher["neurons"], found[1])]
    moved = sum(len(set(a) - set(b)) for a, b in zip(heads + neurons, found[0] + found[1]))
    plan = PruningPlan(keep=neurons, widths=[f.shape[0] for f in fisher["neurons"]], method="kwon",
                       params={"flops": flops}, heads=heads, head_widths=[f.shape[0] for f in fisher["heads"]])
    out = copy_loaded(clf)
    apply_plan(out.model, plan, "physical")
    report = tune_masks(out, clf, calib) if tune else {"tuned": [], "stopped_at": None}
    return {"loaded": out, "plan": plan, "seconds": time.perf_counter() - t0 + (fisher["seconds"] if shared else 0.0),
            "rearranged_units": moved, "tuning": report}
