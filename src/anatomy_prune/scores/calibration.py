"""Calibration: a pinned sample of texts and the statistics of the *unpruned* model on it, computed once and
shared by every method and sparsity (a sweep pays for each statistic once).

One forward pass (`forward_stats`) gives the readout states (for the paper's similarities) and the mean
|activation| of every FFN neuron; one calibration pass (`calibration_pass`), with gradients where the model
has a loss, gives the FFN statistics (`FFNStats`: Gram of [h; 1], Fisher / Taylor sums of neuron masks) and,
on request, the attention heads' (`HeadStats`). Each statistic has its own accumulator (scores.accumulators).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..anatomy.measures import layer_similarity, neuron_similarity, readout_states
from ..data.batches import batches, to_device
from ..data.splits import CALIB_SIZE, calibration_set
from ..errors import UserError
from ..hooks import attn_heads, ffn_hidden, per_layer, run_with_cache, run_with_hooks
from ..linalg import DEFAULT_RIDGE
from ..models.families import attention_sites, ffn_sites, readout_index
from ..models.loading import Loaded
from ..progress import tqdm
from ..validate import positive_int
from .accumulators import FFN, HEADS, ActivationMagnitude, MaskGradients, ReadoutGram, TokenGram, Tokens

log = logging.getLogger(__name__)

__all__ = ["CALIB_MAX_LENGTH", "DEFAULT_RIDGE", "PROTECT_THRESHOLD", "Calibration", "CalibrationPass", "FFNStats",
           "HeadStats", "PassKey", "activation_stats", "calibration_pass", "ffn_input_stats", "forward_stats",
           "important_neurons", "make_calibration", "similarity_stats"]

CALIB_MAX_LENGTH = 128  # tokens per calibration review (the model maximum would blow up memory)
PROTECT_THRESHOLD = 0.35  # the paper's "high cosine similarity": such neurons are the anatomy's important ones
FORWARD, SIMILARITY = ("forward",), ("similarity",)   # cache keys of the forward statistics


def label(key: Hashable) -> str:
    """A cache key as the name `timings` and `used` record it (JSON-ready)."""
    return "+".join(map(str, key)) if isinstance(key, tuple) else str(key)


@dataclass
class Calibration:
    """A model and the texts its data-driven methods look at (a pinned sample of training reviews).
    `cache` keeps statistics of the *unpruned* model by key; `timings` (seconds) and `used` (read since last
    cleared) name them by `label`, so a sweep charges shared statistics as a standalone run would pay."""

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

    def for_model(self, loaded: Loaded) -> "Calibration":
        """The same sample (texts, labels, length, batch, seed) for another model, with no statistics yet."""
        return Calibration(loaded, self.texts, self.labels, self.max_length, self.batch_size, self.seed)

    def batches(self, with_labels: bool = False) -> Iterator[dict]:
        labels = self.labels if with_labels else None
        for b in batches(self.loaded.tokenizer, self.texts, self.batch_size, self.max_length, labels):
            yield to_device(b, self.loaded.device)

    def cached(self, key: Hashable, compute: Callable[[], object]):
        """The statistic `key` (a tuple or a frozen dataclass), computed once by `compute()`, then shared. One
        built on others records them, so reading it marks them used too; `timings` holds its own seconds."""
        name = label(key)
        if key not in self.cache:
            outer, before = self.used, set(self.timings)
            self.used = set()
            start = time.perf_counter()
            try:
                self.cache[key] = compute()
            finally:
                inner, self.used = self.used, outer
            fresh = set(self.timings) - before
            self.deps[name] = inner
            self.timings[name] = time.perf_counter() - start - sum(self.timings[k] for k in fresh)
        self.used |= {name} | self.deps.get(name, set())
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
    max_length = min(positive_int(max_length, "--calib-max-length"), loaded.max_positions)
    cal = calibration_set(n, seed, source, exclude)
    labels = cal.labels if loaded.kind == "classifier" and min(cal.labels, default=0) >= 0 else None
    return Calibration(loaded, cal.texts, labels, max_length=max_length, batch_size=batch_size, seed=seed)


# --- forward statistics of the unpruned model, cached on the Calibration ------------------------------

@torch.no_grad()
def forward_stats(calib: Calibration) -> dict:
    """One pass of the unpruned model over the calibration texts: `states` [n_inputs, L+1, d_model], the readout
    states (CLS / last real token), and `act_mean`, per block [d_ff], the mean |FFN activation| over real tokens."""
    def compute() -> dict:
        if not calib.texts:
            raise UserError("this method needs calibration texts; give --calib-size N with N > 0")
        model, tokens = calib.loaded.model, Tokens()
        with run_with_hooks(model, {"model.input": tokens.observe}), \
                run_with_cache(model, FFN, ActivationMagnitude(tokens)) as sums:
            states = readout_states(calib.loaded, calib.texts, calib.max_length, calib.batch_size)
        if tokens.count == 0:
            raise UserError("the calibration texts have no tokens; give a non-empty calibration set")
        act = [ActivationMagnitude.total(s) / tokens.count for s in per_layer(sums, ffn_hidden, len(ffn_sites(model)))]
        return {"states": states, "act_mean": act}
    return calib.cached(FORWARD, compute)


@torch.no_grad()
def similarity_stats(calib: Calibration) -> dict:
    """The paper's similarities over the calibration texts (from `forward_stats`): layer_sim [L+1] (mean over
    inputs; index 0 = embeddings, i = after block i-1), per block [d_ff] neuron_abs (mean |neuron similarity|)
    and neuron_max (max of the signed neuron similarity)."""
    def compute() -> dict:
        states = forward_stats(calib)["states"]  # [n, L+1, d]
        sims = neuron_similarity(calib.loaded, states[:, -1])  # per block [n, d_ff]
        return {"layer_sim": layer_similarity(states).mean(dim=0),
                "neuron_abs": [s.abs().mean(dim=0) for s in sims],
                "neuron_max": [s.max(dim=0).values for s in sims],
                "n_inputs": int(states.shape[0])}
    return calib.cached(SIMILARITY, compute)


def important_neurons(calib: Calibration, threshold: float = PROTECT_THRESHOLD) -> list[list[int]]:
    """Per layer, the neurons whose similarity is above `threshold` for at least one calibration input."""
    return [torch.nonzero(m > threshold).flatten().tolist() for m in similarity_stats(calib)["neuron_max"]]


def activation_stats(calib: Calibration) -> list[Tensor]:
    """Per layer, the mean |activation| of every FFN neuron over the calibration texts' real tokens: [d_ff]."""
    return forward_stats(calib)["act_mean"]


# --- the calibration pass: FFN and head statistics, with gradients ------------------------------------

@dataclass
class FFNStats:
    """Per-layer sufficient statistics of the FFN hidden activations over the calibration tokens."""

    gram: list[Tensor]                  # per layer [d_ff+1, d_ff+1] float64: sum over tokens of [h; 1][h; 1]^T
    n_tokens: int                       # non-padding tokens seen (= gram[l][-1, -1] in every layer)
    n_examples: int
    fisher: list[Tensor] | None = None  # per layer [d_ff]: sum over examples of (dL_i/dm_j)^2
    taylor: list[Tensor] | None = None  # per layer [d_ff]: sum over examples of dL_i/dm_j (signed)
    readout_gram: list[Tensor] | None = None  # classifiers: the same Gram over readout tokens only
    info: dict = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [g.shape[0] - 1 for g in self.gram]

    def tokens_per_layer(self) -> list[int]:
        return [int(round(g[-1, -1].item())) for g in self.gram]


@dataclass
class HeadStats:
    """Per layer, statistics of the attention head units (a head, or a key/value group): the Fisher / Taylor
    sums of a per-unit mask and the Gram of [c; 1], c what the output projection receives."""

    gram: list[Tensor]                  # per layer [heads*head_dim+1, heads*head_dim+1] float64
    fisher: list[Tensor]                # per layer [units]
    taylor: list[Tensor]                # per layer [units]


@dataclass
class CalibrationPass:
    """What one pass over the calibration batches collected: FFN statistics, head statistics (or None), and
    the mean loss per example (None without gradients)."""

    ffn: FFNStats
    heads: HeadStats | None = None
    loss: float | None = None


@dataclass(frozen=True)
class PassKey:
    """The cache key of a calibration pass: with gradients, with head statistics."""

    grads: bool
    heads: bool

    def __str__(self) -> str:
        return "calibration_pass" + ("+grads" if self.grads else "") + ("+heads" if self.heads else "")

    def serves(self, other: PassKey) -> bool:
        return (self.grads or not other.grads) and (self.heads or not other.heads)


def calibration_pass(calib: Calibration, *, grads: bool | None = None, heads: bool = False,
                     progress: bool = True, cache: bool = True) -> CalibrationPass:
    """The FFN statistics over `calib`'s texts and, with `grads`, the Fisher / Taylor sums under the task loss
    (classifier, labels from calib.labels) or the LM loss; heads=True adds head statistics (with gradients).
    grads=None takes gradients where the model has a loss. Cached on `calib`: a fuller pass serves a lesser
    request; cache=False always recomputes."""
    loaded = calib.loaded
    can_grad = loaded.kind == "causal-lm" or (loaded.kind == "classifier" and calib.labels is not None)
    grads = can_grad if grads is None else bool(grads)
    if grads and not can_grad:
        _loss(loaded, {})  # raises the UserError that says why
    if not calib.texts:
        raise UserError("the calibration set is empty; give at least one text")
    if heads and not grads:
        raise ValueError("head statistics are collected with gradients")
    want = PassKey(grads, heads)
    if not cache:
        return _run_pass(calib, grads, heads, progress)
    for key in (PassKey(True, True), PassKey(True, False)):
        if key in calib.cache and key.serves(want):
            return calib.cached(key, lambda: None)
    return calib.cached(want, lambda: _run_pass(calib, grads, heads, progress))


def ffn_input_stats(calib: Calibration, *, grads: bool | None = None, progress: bool = True,
                    cache: bool = True) -> FFNStats:
    """The FFN statistics of `calibration_pass` (what least-squares compensation and the scores need)."""
    return calibration_pass(calib, grads=grads, progress=progress, cache=cache).ffn


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


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode, and no weight needs a gradient (only activation gradients are taken); restored after."""
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)


def _run_pass(calib: Calibration, grads: bool, heads: bool, progress: bool) -> CalibrationPass:
    """One pass over the calibration batches, each statistic fed to its accumulator by its hook point."""
    loaded, model = calib.loaded, calib.loaded.model
    tokens, readout = Tokens(), loaded.kind == "classifier"
    neuron_grads = MaskGradients(model, FFN) if grads else None
    head_grads = MaskGradients(model, HEADS) if heads else None
    n_examples, loss_sum, start = 0, 0.0, time.perf_counter()
    with _frozen(model), contextlib.ExitStack() as stack:
        ffn_gram = stack.enter_context(run_with_cache(model, FFN, TokenGram(tokens)))
        ro_gram = stack.enter_context(run_with_cache(model, FFN, ReadoutGram(tokens))) if readout else None
        h_gram = stack.enter_context(run_with_cache(model, HEADS, TokenGram(tokens))) if heads else None
        for batch in tqdm(calib.batches(with_labels=grads and readout), total=math.ceil(len(calib.texts) / calib.batch_size),
                          desc="calibration", disable=not progress, leave=False):
            tokens.set(batch["attention_mask"], readout_index(loaded.family, batch["attention_mask"]))  # [batch, pos], [batch]
            if grads:
                with torch.enable_grad(), neuron_grads.masked(), \
                        (head_grads.masked() if heads else contextlib.nullcontext()):
                    with loaded.autocast():
                        loss = _loss(loaded, batch)
                    loss.backward()
                loss_sum += loss.item()
                for acc in (neuron_grads, head_grads):
                    if acc is not None:
                        acc.add_gradients()
            else:
                with torch.no_grad(), loaded.autocast():
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            n_examples += int(batch["input_ids"].shape[0])
    n_ffn = len(ffn_sites(model))
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
    ffn = FFNStats(gram=cpu(per_layer(ffn_gram, ffn_hidden, n_ffn)), n_tokens=tokens.count, n_examples=n_examples,
                   fisher=cpu(neuron_grads.fisher) if grads else None, taylor=cpu(neuron_grads.taylor) if grads else None,
                   readout_gram=cpu(per_layer(ro_gram, ffn_hidden, n_ffn)) if readout else None,
                   info={"max_length": calib.max_length, "batch_size": calib.batch_size, "n_texts": len(calib.texts),
                         "seconds": round(time.perf_counter() - start, 2)})
    head = None
    if heads:
        n_att = len(attention_sites(model))
        head = HeadStats(gram=cpu(per_layer(h_gram, attn_heads, n_att)), fisher=cpu(head_grads.fisher),
                         taylor=cpu(head_grads.taylor))
    log.info("calibration statistics: %d examples, %d tokens, %d layers in %.1f s%s", n_examples, tokens.count,
             n_ffn, ffn.info["seconds"], " (with gradients)" if grads else "")
    return CalibrationPass(ffn, head, loss_sum / max(1, n_examples) if grads else None)
