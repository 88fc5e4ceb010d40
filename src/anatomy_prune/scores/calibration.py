"""Calibration: a pinned sample of texts and the statistics of the *unpruned* model on it, computed once and
shared by every method and sparsity (a sweep pays for each statistic once).

One forward pass (`forward_stats`) gives the readout states (for the paper's similarities) and the mean
|activation| of every FFN neuron; one pass with gradients (`ffn_input_stats`) gives, per layer, the Gram
matrix of the FFN's hidden activation [h; 1] over real tokens (what least-squares compensation needs) and
the Fisher / Taylor sums of a per-neuron mask under the task or LM loss (Kwon et al. 2022's mask scores).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..anatomy.measures import layer_similarity, neuron_similarity, readout_states
from ..data.batches import batches, to_device
from ..data.splits import CALIB_SIZE, calibration_set
from ..errors import UserError
from ..hooks import capture_ffn_hidden, layer_of, run_with_hooks
from ..models.families import attention_sites, ffn_sites, ffn_widths, readout_index
from ..models.loading import Loaded

log = logging.getLogger(__name__)

CALIB_MAX_LENGTH = 128  # tokens per calibration review (the model maximum would blow up memory)
PROTECT_THRESHOLD = 0.35  # the paper's "high cosine similarity": such neurons are the anatomy's important ones
DEFAULT_RIDGE = 1e-2      # least-squares compensation's ridge, times the mean diagonal of the kept neurons' Gram


@dataclass
class Calibration:
    """A model and the texts its data-driven methods look at (a pinned sample of training reviews).

    `cache` keeps statistics of the *unpruned* model by name, `timings` the seconds each took, and `used`
    the names a method read since it was last cleared (a sweep uses them to charge shared statistics to
    every point that needs them, so its `prune_s` is what a standalone `prune` would take).
    """

    loaded: Loaded
    texts: list[str]
    labels: list[int] | None = None
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0
    cache: dict = field(default_factory=dict, repr=False)
    timings: dict = field(default_factory=dict, repr=False)
    used: set = field(default_factory=set, repr=False)
    deps: dict = field(default_factory=dict, repr=False)

    def batches(self, with_labels: bool = False) -> Iterator[dict]:
        labels = self.labels if with_labels else None
        for b in batches(self.loaded.tokenizer, self.texts, self.batch_size, self.max_length, labels):
            yield to_device(b, self.loaded.device)

    def cached(self, key: str, compute: Callable[[], object]):
        """The statistic `key`, computed once by `compute()` and then shared. A statistic built on others
        records them, so reading it marks them used too; `timings` holds each one's own seconds."""
        if key not in self.cache:
            outer, before = self.used, set(self.timings)
            self.used = set()
            start = time.perf_counter()
            try:
                self.cache[key] = compute()
            finally:
                inner, self.used = self.used, outer
            fresh = set(self.timings) - before
            self.deps[key] = inner
            self.timings[key] = time.perf_counter() - start - sum(self.timings[k] for k in fresh)
        self.used |= {key} | self.deps.get(key, set())
        return self.cache[key]

    @contextmanager
    def charged(self) -> Iterator[dict]:
        """Time a block as a standalone run would pay for it: statistics it reads that an earlier block
        computed are charged at their own cost, and each statistic computed inside counts once. Yields a
        dict that holds `seconds` after the block."""
        self.used = set()
        before = set(self.timings)
        start = time.perf_counter()
        out: dict = {}
        try:
            yield out
        finally:
            wall = time.perf_counter() - start
            fresh = sum(self.timings[k] for k in set(self.timings) - before)
            out["seconds"] = wall - fresh + sum(self.timings.get(k, 0.0) for k in self.used)


def make_calibration(loaded: Loaded, n: int = CALIB_SIZE, max_length: int = CALIB_MAX_LENGTH, seed: int = 0,
                     source: str = "imdb", exclude: Sequence[str] = (), batch_size: int = 16) -> Calibration:
    """The calibration sample for `loaded` (data.calibration_set), labelled for a classifier."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise UserError(f"--calib-max-length must be a positive whole number, got {max_length}")
    max_length = min(max_length, loaded.max_positions)
    cal = calibration_set(n, seed, source, exclude)
    labels = cal.labels if loaded.kind == "classifier" and min(cal.labels, default=0) >= 0 else None
    return Calibration(loaded, cal.texts, labels, max_length=max_length, batch_size=batch_size, seed=seed)


# --- statistics of the unpruned model, cached on the Calibration ----------------------------------

@torch.no_grad()
def forward_stats(calib: Calibration) -> dict:
    """One pass of the unpruned model over the calibration texts, for every data-driven statistic:

    states:    [n_inputs, L+1, d_model] readout states (anatomy.readout_states: CLS / last real token)
    act_mean:  per block [d_ff], mean |FFN activation| over the real (non-padding) tokens
    Hooks reduce each batch's activations to a per-neuron sum at once, so memory stays O(layers x d_ff).
    """
    def compute() -> dict:
        model = calib.loaded.model
        current: dict[str, Tensor] = {}

        def remember_mask(kwargs: dict, _point: str) -> None:  # the batch's attention mask, for the reduce below
            current["mask"] = kwargs["attention_mask"]  # [batch, pos]
            current["tokens"] = current.get("tokens", 0) + int(kwargs["attention_mask"].sum())

        def reduce(x: Tensor) -> Tensor:  # x: [batch, pos, d_ff] -> [d_ff]
            m = current["mask"].to(x.dtype).unsqueeze(-1)  # [batch, pos, 1]
            return (x.abs() * m).sum(dim=(0, 1)).float().cpu()

        if not calib.texts:
            raise UserError("this method needs calibration texts; give --calib-size N with N > 0")
        with run_with_hooks(model, {"model.input": remember_mask}), capture_ffn_hidden(model, reduce) as acts:
            states = readout_states(calib.loaded, calib.texts, calib.max_length, calib.batch_size)
        n_tokens = current.get("tokens", 0)
        if n_tokens == 0:
            raise UserError("the calibration texts have no tokens; give a non-empty calibration set")
        return {"states": states, "act_mean": [torch.stack(a).sum(dim=0) / n_tokens for a in acts]}
    return calib.cached("forward", compute)


@torch.no_grad()
def similarity_stats(calib: Calibration) -> dict:
    """The paper's similarities over the calibration texts (from `forward_stats`).

    layer_sim:      [L+1] mean over inputs of the layer similarity (index 0 = embeddings, i = after block i-1)
    neuron_abs:     per block [d_ff], mean over inputs of |neuron similarity|
    neuron_max:     per block [d_ff], max over inputs of the signed neuron similarity
    """
    def compute() -> dict:
        states = forward_stats(calib)["states"]  # [n, L+1, d]
        sims = neuron_similarity(calib.loaded, states[:, -1])  # per block [n, d_ff]
        return {"layer_sim": layer_similarity(states).mean(dim=0),
                "neuron_abs": [s.abs().mean(dim=0) for s in sims],
                "neuron_max": [s.max(dim=0).values for s in sims],
                "n_inputs": int(states.shape[0])}
    return calib.cached("similarity", compute)


def important_neurons(calib: Calibration, threshold: float = PROTECT_THRESHOLD) -> list[list[int]]:
    """Per layer, the neurons whose similarity is above `threshold` for at least one calibration input."""
    return [torch.nonzero(m > threshold).flatten().tolist() for m in similarity_stats(calib)["neuron_max"]]


def activation_stats(calib: Calibration) -> list[Tensor]:
    """Per layer, the mean |activation| of every FFN neuron over the calibration texts' real tokens: [d_ff]."""
    return forward_stats(calib)["act_mean"]


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
    # attention heads (with heads=True): per layer, the Fisher / Taylor sums of a per-unit mask (a head, or a
    # key/value group under grouped-query attention) and the Gram of [c; 1], c = what the attention's output
    # projection receives (the heads' concatenated context), for least-squares compensation of heads
    head_fisher: list[Tensor] | None = None   # per layer [units]
    head_taylor: list[Tensor] | None = None   # per layer [units]
    head_gram: list[Tensor] | None = None     # per layer [heads*head_dim+1, heads*head_dim+1] float64

    @property
    def widths(self) -> list[int]:
        return [g.shape[0] - 1 for g in self.gram]

    def tokens_per_layer(self) -> list[int]:
        return [int(round(g[-1, -1].item())) for g in self.gram]

# --- one pass over the calibration set ------------------------------------------------------------

@contextmanager
def head_masks(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Multiply each attention's per-head context by a per-example mask of ones per head unit (a head, or a
    key/value group with all its query heads) that requires grad; yields per layer the masks
    ([batch, units] each), whose .grad after a backward is dL/dm for each example and unit."""
    sites = attention_sites(model)
    store: list[list[Tensor]] = [[] for _ in sites]

    def apply_mask(x: Tensor, point: str) -> Tensor:                   # x: [batch, pos, heads*head_dim]
        site = sites[layer_of(point)]
        u = site.n_units
        m = torch.ones(x.shape[0], u, device=x.device, dtype=x.dtype, requires_grad=True)
        store[site.layer].append(m)
        return (x.view(*x.shape[:2], u, -1) * m[:, None, :, None]).view_as(x)

    with run_with_hooks(model, {"attn.*.heads": apply_mask}):
        yield store


@contextmanager
def neuron_masks(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Multiply each FFN's hidden activations by a per-example mask of ones that requires grad.

    Yields, per layer, the masks of the forward passes run inside ([batch, 1, d_ff] each); after a backward,
    mask.grad[i, 0, j] = dL/dm_j for example i = sum over its tokens of a_j * dL/da_j.
    """
    store: list[list[Tensor]] = [[] for _ in ffn_sites(model)]

    def apply_mask(x: Tensor, point: str) -> Tensor:                   # x: [batch, pos, d_ff]
        m = torch.ones(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
        store[layer_of(point)].append(m)
        return x * m

    with run_with_hooks(model, {"ffn.*.hidden": apply_mask}):
        yield store


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
                    cache: bool = True, heads: bool = False) -> FFNStats:
    """One pass over `calib` (a methods.Calibration): per layer the Gram matrix of [h; 1] over non-padding
    tokens (h: what the down projection receives), and, with `grads`, the Fisher / Taylor sums of a
    per-neuron mask under the task loss (classifier, labels from calib.labels) or the LM loss.

    grads=None takes gradients when the model has a loss (classifier with labels, causal LM). The result is
    kept on the Calibration (`calib.cached`, statistics of the unpruned model), so the prune pipeline's call
    after the `calibrated` method, or a sweep's next sparsity, reuses it; `cache=False` always recomputes.
    heads=True also collects the attention heads' statistics (FFNStats.head_*), with gradients.
    """
    can_grad = loaded.kind == "causal-lm" or (loaded.kind == "classifier" and calib.labels is not None)
    if grads is None:
        grads = can_grad
    if grads and not can_grad:
        _loss(loaded, {})  # raises the UserError that says why
    if not calib.texts:
        raise UserError("the calibration set is empty; give at least one text")
    if heads and not grads:
        raise ValueError("head statistics are collected with gradients")
    shared = cache and hasattr(calib, "cached") and calib.loaded.model is loaded.model
    if not shared:
        return _collect(loaded, calib, grads, progress, heads)
    if "ffn_stats+grads+heads" in calib.cache:  # the fullest statistics serve every request
        return calib.cached("ffn_stats+grads+heads", lambda: None)
    if not heads and not grads and "ffn_stats+grads" in calib.cache:  # with gradients serve without too
        return calib.cached("ffn_stats+grads", lambda: None)
    key = "ffn_stats+grads+heads" if heads else ("ffn_stats+grads" if grads else "ffn_stats")
    return calib.cached(key, lambda: _collect(loaded, calib, grads, progress, heads))


def _collect(loaded: Loaded, calib, grads: bool, progress: bool, heads: bool = False) -> FFNStats:
    model = loaded.model
    widths = ffn_widths(model)
    dev = loaded.device
    acc = [torch.zeros(w + 1, w + 1, dtype=torch.float64, device=dev) for w in widths]
    readout = loaded.kind == "classifier"
    acc_ro = [torch.zeros(w + 1, w + 1, dtype=torch.float64, device=dev) for w in widths] if readout else None
    fisher = [torch.zeros(w, dtype=torch.float64, device=dev) for w in widths] if grads else None
    taylor = [torch.zeros(w, dtype=torch.float64, device=dev) for w in widths] if grads else None
    sites = attention_sites(model) if heads else []
    h_acc = [torch.zeros(s.n_heads * s.head_dim + 1, s.n_heads * s.head_dim + 1, dtype=torch.float64, device=dev)
             for s in sites]
    h_fisher = [torch.zeros(s.n_units, dtype=torch.float64, device=dev) for s in sites]
    h_taylor = [torch.zeros(s.n_units, dtype=torch.float64, device=dev) for s in sites]
    state: dict = {}

    def gram(h: Tensor) -> Tensor:  # h: [tokens, d_ff] -> [d_ff+1, d_ff+1], float32 (one batch's sum)
        z = torch.cat([h.float(), torch.ones(h.shape[0], 1, device=h.device)], dim=1)  # [tokens, d_ff+1]
        return z.t() @ z

    def gram_of_tokens(x: Tensor) -> tuple[Tensor, Tensor | None]:  # x: [batch, pos, d_ff]
        ro = gram(x[torch.arange(x.shape[0], device=x.device), state["readout"]]) if readout else None
        return gram(x[state["mask"]]), ro

    def head_gram(x: Tensor, point: str) -> None:  # x: [batch, pos, heads*head_dim], accumulated in float64
        h_acc[layer_of(point)] += gram(x.detach()[state["mask"]])

    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    n_tokens = n_examples = 0
    loss_sum = 0.0
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # only activation gradients are needed: no weight-gradient matmuls
        with capture_ffn_hidden(model, gram_of_tokens) as store, \
                run_with_hooks(model, {"attn.*.heads": head_gram} if heads else {}):
            n_batches = math.ceil(len(calib.texts) / calib.batch_size)
            for batch in tqdm(calib.batches(with_labels=grads and loaded.kind == "classifier"),
                              total=n_batches, desc="calibration", disable=not progress, leave=False):
                state["mask"] = batch["attention_mask"].bool()                     # [batch, pos]
                state["readout"] = readout_index(loaded.family, batch["attention_mask"])  # [batch]
                if grads:
                    with torch.enable_grad(), neuron_masks(model) as masks, \
                            (head_masks(model) if heads else contextlib.nullcontext([])) as hmasks:
                        with loaded.autocast():
                            loss = _loss(loaded, batch)
                        loss.backward()
                    loss_sum += loss.item()
                    for layer, ms in enumerate(masks):
                        g = torch.cat([m.grad[:, 0].float() for m in ms]).double()  # [batch, d_ff]
                        fisher[layer] += (g * g).sum(0)
                        taylor[layer] += g.sum(0)
                    for layer, ms in enumerate(hmasks):
                        g = torch.cat([m.grad.float() for m in ms]).double()        # [batch, units]
                        h_fisher[layer] += (g * g).sum(0)
                        h_taylor[layer] += g.sum(0)
                else:
                    with torch.no_grad(), loaded.autocast():
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
                     head_fisher=[f.cpu() for f in h_fisher] if heads else None,
                     head_taylor=[t.cpu() for t in h_taylor] if heads else None,
                     head_gram=[g.cpu() for g in h_acc] if heads else None,
                     info={"max_length": calib.max_length, "batch_size": calib.batch_size,
                           "n_texts": len(calib.texts), "seconds": round(time.perf_counter() - start, 2)})
    log.info("calibration statistics: %d examples, %d tokens, %d layers in %.1f s%s", n_examples, n_tokens,
             len(widths), stats.info["seconds"], " (with gradients)" if grads else "")
    return stats


