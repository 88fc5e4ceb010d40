"""Compensation: rebuild what removed FFN neurons contributed from the neurons that stay, without retraining.

For each layer, the removed neurons' activations h_R are regressed on the kept ones and a constant,
h_R ~ A h_K + c, by ridge-regularised least squares over the calibration tokens, and the fit is folded into
the down projection of the UNPRUNED model:  W_K <- W_K + W_R A,  b <- b + W_R c.  After `apply.physical`
slices the removed neurons away, the model is a plain dense model that is simply smaller.

Everything the fit needs is a per-layer sufficient statistic, the Gram matrix of [h; 1] over non-padding
tokens, collected in one pass by `ffn_input_stats` (raw activations are never kept). The same pass can
also collect per-neuron sensitivity sums (Fisher / Taylor of a neuron mask, Kwon et al. 2022) from the
gradient of the task loss (classifiers) or the LM loss (causal LMs).

Because the least-squares fit is the same in activation space and in output space (the target W_R h_R is
linear in h_R), the output-space reconstruction error can only fall: the ridge solution is never worse on
the calibration tokens than plain removal (A = 0, c = 0).

Down projections without a bias (Llama-like families) get the best fit WITHOUT the constant column, so
only the linear part is folded in and the saved model keeps the family's own layout (plain transformers
loads it); the mean shift c that a bias would carry is lost, which the diagnostics show.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import UserError
from .families import base_model, ffn_sites, ffn_widths, get_module, readout_index, weight_out_in
from .hooks import capture_ffn_activations
from .models import Loaded
from .plan import PruningPlan

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-2     # times the mean diagonal of the kept neurons' Gram block
ILL_POSED_RIDGE = 1e-1   # at least this when there are fewer calibration tokens than unknowns per output


@dataclass
class FFNStats:
    """Per-layer sufficient statistics of the FFN hidden activations over the calibration tokens."""

    gram: list[Tensor]                  # per layer [d_ff+1, d_ff+1] float64: sum over tokens of [h; 1][h; 1]^T
    n_tokens: int                       # non-padding tokens seen (= gram[l][-1, -1] in every layer)
    n_examples: int
    fisher: list[Tensor] | None = None  # per layer [d_ff]: sum over examples of (dL_i/dm_j)^2
    taylor: list[Tensor] | None = None  # per layer [d_ff]: sum over examples of dL_i/dm_j (signed)
    loss: float | None = None           # mean calibration loss (task or LM) when gradients were taken
    readout_gram: list[Tensor] | None = None  # classifiers: the same Gram over readout tokens only
    info: dict = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [g.shape[0] - 1 for g in self.gram]

    def tokens_per_layer(self) -> list[int]:
        return [int(round(g[-1, -1].item())) for g in self.gram]

    def mean(self, layer: int) -> Tensor:
        """Mean activation of each neuron: [d_ff]."""
        g = self.gram[layer]
        return g[:-1, -1] / max(1.0, g[-1, -1].item())

    def second_moment(self, layer: int) -> Tensor:
        """Mean squared activation of each neuron: [d_ff]."""
        g = self.gram[layer]
        return torch.diagonal(g)[:-1] / max(1.0, g[-1, -1].item())


# --- one pass over the calibration set ------------------------------------------------------------

@contextmanager
def _neuron_masks(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Multiply each FFN's hidden activations by a per-example mask of ones that requires grad.

    Yields, per layer, the masks of the forward passes run inside ([batch, 1, d_ff] each); after a backward,
    mask.grad[i, 0, j] = dL/dm_j for example i = sum over its tokens of a_j * dL/da_j. Hooks always removed.
    """
    base = base_model(model)
    sites = ffn_sites(model)
    store: list[list[Tensor]] = [[] for _ in sites]
    handles = []
    for site in sites:
        def pre(_mod, args, layer=site.layer):
            x = args[0]                                                       # [batch, pos, d_ff]
            m = torch.ones(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
            store[layer].append(m)
            return (x * m,) + tuple(args[1:])
        handles.append(get_module(base, site.down).register_forward_pre_hook(pre))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _loss(loaded: Loaded, batch: dict) -> Tensor:
    """Sum over examples of each example's loss (so per-example gradients are not rescaled)."""
    model = loaded.model
    if loaded.kind == "classifier":
        if "labels" not in batch:
            raise UserError("sensitivity scores of a classifier need labelled calibration data")
        logit = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # [batch]
        return nn.functional.binary_cross_entropy_with_logits(logit.float(), batch["labels"].float(),
                                                              reduction="sum")
    if loaded.kind == "causal-lm":
        ids, att = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()  # [batch, pos-1, vocab]
        target = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)                   # [batch, pos-1]
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [batch, pos-1]
        per_example = nll.sum(1) / (target != -100).sum(1).clamp(min=1)
        return per_example.sum()
    raise UserError(f"sensitivity scores need a task or LM loss; '{loaded.spec}' is a bare {loaded.kind}: "
                    "fine-tune it first (anatomy-prune finetune) or use a causal LM")


def ffn_input_stats(loaded: Loaded, calib, *, grads: bool | None = None, progress: bool = True,
                    cache: bool = True) -> FFNStats:
    """One pass over `calib` (a methods.Calibration): per layer the Gram matrix of [h; 1] over non-padding
    tokens (h: what the down projection receives), and, with `grads`, the Fisher / Taylor sums of a
    per-neuron mask under the task loss (classifier, labels from calib.labels) or the LM loss.

    grads=None takes gradients when the model has a loss (classifier with labels, causal LM). The result is
    kept on the Calibration (`calib.cached`, statistics of the unpruned model), so the prune pipeline's call
    after the `calibrated` method, or a sweep's next sparsity, reuses it; `cache=False` always recomputes.
    """
    can_grad = loaded.kind == "causal-lm" or (loaded.kind == "classifier" and calib.labels is not None)
    if grads is None:
        grads = can_grad
    if grads and not can_grad:
        _loss(loaded, {})  # raises the UserError that says why
    if not calib.texts:
        raise UserError("the calibration set is empty; give at least one text")
    shared = cache and hasattr(calib, "cached") and calib.loaded.model is loaded.model
    if not shared:
        return _collect(loaded, calib, grads, progress)
    if not grads and "ffn_stats+grads" in calib.cache:  # statistics with gradients serve without too
        return calib.cached("ffn_stats+grads", lambda: None)
    key = "ffn_stats+grads" if grads else "ffn_stats"
    return calib.cached(key, lambda: _collect(loaded, calib, grads, progress))


def _collect(loaded: Loaded, calib, grads: bool, progress: bool) -> FFNStats:
    model = loaded.model
    widths = ffn_widths(model)
    dev = loaded.device
    acc = [torch.zeros(w + 1, w + 1, dtype=torch.float64, device=dev) for w in widths]
    readout = loaded.kind == "classifier"
    acc_ro = [torch.zeros(w + 1, w + 1, dtype=torch.float64, device=dev) for w in widths] if readout else None
    fisher = [torch.zeros(w, dtype=torch.float64, device=dev) for w in widths] if grads else None
    taylor = [torch.zeros(w, dtype=torch.float64, device=dev) for w in widths] if grads else None
    state: dict = {}

    def gram(h: Tensor) -> Tensor:  # h: [tokens, d_ff] -> [d_ff+1, d_ff+1], float32 (one batch's sum)
        z = torch.cat([h.float(), torch.ones(h.shape[0], 1, device=h.device)], dim=1)  # [tokens, d_ff+1]
        return z.t() @ z

    def gram_of_tokens(x: Tensor) -> tuple[Tensor, Tensor | None]:  # x: [batch, pos, d_ff]
        ro = gram(x[torch.arange(x.shape[0], device=x.device), state["readout"]]) if readout else None
        return gram(x[state["mask"]]), ro

    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    n_tokens = n_examples = 0
    loss_sum = 0.0
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # only activation gradients are needed: no weight-gradient matmuls
        with capture_ffn_activations(model, reduce=gram_of_tokens) as store:
            n_batches = math.ceil(len(calib.texts) / calib.batch_size)
            for batch in tqdm(calib.batches(with_labels=grads and loaded.kind == "classifier"),
                              total=n_batches, desc="calibration", disable=not progress, leave=False):
                state["mask"] = batch["attention_mask"].bool()                     # [batch, pos]
                state["readout"] = readout_index(loaded.family, batch["attention_mask"])  # [batch]
                if grads:
                    with torch.enable_grad(), _neuron_masks(model) as masks:
                        loss = _loss(loaded, batch)
                        loss.backward()
                    loss_sum += loss.item()
                    for layer, ms in enumerate(masks):
                        g = torch.cat([m.grad[:, 0] for m in ms]).double()         # [batch, d_ff]
                        fisher[layer] += (g * g).sum(0)
                        taylor[layer] += g.sum(0)
                else:
                    with torch.no_grad():
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                for layer, grams in enumerate(store):
                    for g, g_ro in grams:    # accumulated across batches in float64
                        acc[layer] += g
                        if readout:
                            acc_ro[layer] += g_ro
                    grams.clear()
                n_tokens += int(state["mask"].sum())
                n_examples += int(batch["input_ids"].shape[0])
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    stats = FFNStats(gram=[g.cpu() for g in acc], n_tokens=n_tokens, n_examples=n_examples,
                     fisher=[f.cpu() for f in fisher] if grads else None,
                     taylor=[t.cpu() for t in taylor] if grads else None,
                     loss=loss_sum / max(1, n_examples) if grads else None,
                     readout_gram=[g.cpu() for g in acc_ro] if readout else None,
                     info={"max_length": calib.max_length, "batch_size": calib.batch_size,
                           "n_texts": len(calib.texts), "seconds": round(time.perf_counter() - start, 2)})
    log.info("calibration statistics: %d examples, %d tokens, %d layers in %.1f s%s", n_examples, n_tokens,
             len(widths), stats.info["seconds"], " (with gradients)" if grads else "")
    return stats


# --- the least-squares fit ------------------------------------------------------------------------

def _check_stats(model: nn.Module, stats: FFNStats) -> None:
    widths = ffn_widths(model)
    if stats.widths != widths:
        raise UserError(f"calibration statistics are for FFN widths {stats.widths[:4]}... but the model has "
                        f"{widths[:4]}...; collect them on the unpruned model the plan was made for")


def fit_removed(gram: Tensor, keep: list[int], removed: list[int], *, intercept: bool = True,
                ridge: float = DEFAULT_RIDGE, layer: int | None = None,
                n_samples: float | None = None) -> tuple[Tensor, dict]:
    """Ridge least squares of the removed neurons on the kept ones (and a constant when `intercept`).

    gram: [d_ff+1, d_ff+1] float64 Gram of [h; 1]. Returns B: [|K| (+1), |R|] with h_R ~ B^T [h_K; 1],
    and what was done (ridge actually used, whether the fit was ill-posed). The constant column is not
    penalised; the ridge is `ridge` times the mean diagonal of the kept block. n_samples: how many
    tokens the Gram sums over, when it is not gram[-1, -1] (a reweighted Gram).
    """
    d = gram.shape[0] - 1
    n_tok = float(gram[-1, -1]) if n_samples is None else float(n_samples)
    cols = list(keep) + ([d] if intercept else [])
    where = f"layer {layer}: " if layer is not None else ""
    info = {"ill_posed": False, "ridge": float(ridge)}
    if not removed or not cols:
        return gram.new_zeros(len(cols), len(removed)), info
    kidx = torch.tensor(cols, dtype=torch.long)
    ridx = torch.tensor(removed, dtype=torch.long)
    a = gram[kidx][:, kidx]                                    # [|K|+1, |K|+1]
    rhs = gram[kidx][:, ridx]                                  # [|K|+1, |R|]
    n_unknown = len(cols)
    if n_tok < n_unknown:
        info["ill_posed"] = True
        if ridge < ILL_POSED_RIDGE:
            log.warning("%sonly %d calibration tokens for %d unknowns per removed neuron: the fit is "
                        "ill-posed; regularising with ridge %.3g (use more or longer calibration texts)",
                        where, int(n_tok), n_unknown, ILL_POSED_RIDGE)
            ridge = ILL_POSED_RIDGE
    pen = torch.ones(len(cols), dtype=gram.dtype)
    if intercept:
        pen[-1] = 0.0                                          # the constant column is not penalised
    scale = float(torch.diagonal(a)[: len(keep)].mean().clamp(min=1e-12)) if keep else 1.0
    for attempt in range(8):
        chol, bad = torch.linalg.cholesky_ex(a + torch.diag(ridge * scale * pen))
        if bad == 0:
            break
        new = ridge * 10 if ridge > 0 else 1e-8
        if attempt == 0:
            log.warning("%sthe kept neurons' Gram matrix is singular (dead or duplicate neurons, or too few "
                        "tokens); regularising more (ridge %.3g -> %.3g)", where, ridge, new)
        info["ill_posed"] = True
        ridge = new
    else:
        raise UserError(f"{where}could not fit the compensation even with strong regularisation; "
                        "check the calibration data (is it empty or constant?)")
    info["ridge"] = float(ridge)
    return torch.cholesky_solve(rhs, chol), info


def _quad(w: Tensor, m: Tensor) -> float:
    """trace(w m w^T) for w [out, n], m [n, n]."""
    return float(((w @ m) * w).sum())


@torch.no_grad()
def layer_gram(stats: FFNStats, layer: int, readout_mix: float = 0.0) -> tuple[Tensor, float]:
    """The Gram a layer's fit uses, and how many tokens it rests on. In the last layer of a classifier only
    the readout token reaches the head, so readout_mix of its weight (0..1) goes to readout tokens."""
    g = stats.gram[layer]
    last = layer == len(stats.gram) - 1
    if not (last and readout_mix > 0 and stats.readout_gram is not None):
        return g, float(g[-1, -1])
    g_ro = stats.readout_gram[layer]
    n_all, n_ro = float(g[-1, -1]), max(1.0, float(g_ro[-1, -1]))
    mixed = (1 - readout_mix) * g + readout_mix * (n_all / n_ro) * g_ro   # per-token means weighted, x n_all
    return mixed, (n_ro if readout_mix >= 1 else n_all)


@torch.no_grad()
def compensate(model: nn.Module, plan: PruningPlan, stats: FFNStats, ridge: float | None = None,
               intercept: bool | None = None, readout_mix: float | None = None) -> dict:
    """Fold a least-squares reconstruction of each layer's removed neurons into its kept down-projection
    columns (and its bias), in place, on the UNPRUNED model; then `apply.physical` (or `apply.mask`).

    intercept=None fits the constant column only where the down projection has a bias to carry it.
    ridge and readout_mix (see `layer_gram`) default to the plan's own (plan.params, set by the `calibrated`
    method), else DEFAULT_RIDGE and 0.
    Returns per-layer diagnostics: relative reconstruction error of the layer output on the calibration
    tokens with plain removal (`rel_err_removed`) and after compensation (`rel_err_compensated`).
    """
    plan.check_fits(model)
    _check_stats(model, stats)
    ridge = float(plan.params.get("ridge", DEFAULT_RIDGE) if ridge is None else ridge)
    readout_mix = float(plan.params.get("readout_mix", 0.0) if readout_mix is None else readout_mix)
    if ridge < 0 or not 0.0 <= readout_mix <= 1.0:
        raise UserError(f"ridge must be >= 0 and readout_mix in [0, 1]; got {ridge} and {readout_mix}")
    if getattr(model, "_anatomy_prune_compensated", False):
        raise UserError("this model was already compensated; compensate the unpruned model once, then apply")
    base = base_model(model)
    layers = []
    for site in ffn_sites(model):
        down = get_module(base, site.down)
        keep, removed = plan.keep[site.layer], plan.removed(site.layer)
        w_view = weight_out_in(down)                                          # [d_model, d_ff] (a view)
        bias = getattr(down, "bias", None)
        has_bias = bias is not None
        use_c = has_bias if intercept is None else (intercept and has_bias)
        g, n_samples = layer_gram(stats, site.layer, readout_mix)             # [d_ff+1, d_ff+1]
        d = g.shape[0] - 1
        w = w_view.detach().double().cpu()
        b = bias.detach().double().cpu() if has_bias else torch.zeros(w.shape[0], dtype=torch.float64)
        wz = torch.cat([w, b[:, None]], dim=1)                                 # [d_model, d_ff+1]
        total = _quad(wz, g)
        entry = {"layer": site.layer, "kept": len(keep), "removed": len(removed), "intercept": use_c}
        if not removed:
            entry.update(rel_err_removed=0.0, rel_err_compensated=0.0, ridge=0.0, ill_posed=False)
            layers.append(entry)
            continue
        coef, info = fit_removed(g, keep, removed, intercept=use_c, ridge=ridge, layer=site.layer,
                                 n_samples=n_samples)
        cols = list(keep) + ([d] if use_c else [])
        kidx, ridx = torch.tensor(cols, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
        w_r = w[:, ridx]                                                      # [d_model, |R|]
        g_rr, g_kr, g_kk = g[ridx][:, ridx], g[kidx][:, ridx], g[kidx][:, kidx]
        before = _quad(w_r, g_rr)
        delta = w_r @ coef.t()                                                # [d_model, |K| (+1)]
        # sum over tokens of ||W_R h_R - delta z_K||^2, expanded in Gram blocks
        after = before - 2 * float(((delta @ g_kr) * w_r).sum()) + _quad(delta, g_kk)
        new_w = w.clone()
        new_w[:, keep] += delta[:, : len(keep)]
        w_view[:, torch.tensor(keep, dtype=torch.long, device=w_view.device)] = new_w[:, keep].to(
            w_view.dtype).to(w_view.device)
        if use_c:
            bias += delta[:, -1].to(bias.dtype).to(bias.device)
        entry.update(rel_err_removed=before / max(total, 1e-30), rel_err_compensated=after / max(total, 1e-30),
                     **info)
        layers.append(entry)
    model._anatomy_prune_compensated = True
    mean = lambda k: sum(e[k] for e in layers) / max(1, len(layers))  # noqa: E731
    report = {"layers": layers, "ridge": ridge, "readout_mix": readout_mix, "n_tokens": stats.n_tokens,
              "mean_rel_err_removed": mean("rel_err_removed"),
              "mean_rel_err_compensated": mean("rel_err_compensated"),
              "ill_posed_layers": [e["layer"] for e in layers if e.get("ill_posed")]}
    log.info("compensation: mean relative reconstruction error %.4f -> %.4f over %d layers",
             report["mean_rel_err_removed"], report["mean_rel_err_compensated"], len(layers))
    return report
