"""Pruning methods behind one registry (the CLI's choices come from it).

A method turns a model and its calibration data into a PruningPlan: `make_plan(name, calib, sparsity,
**params)` is the one entry point. Every method can be driven by a target sparsity (the fraction of all FFN
neurons removed), so methods are compared at equal sparsity; `strategy` can also be driven by its own
parameters (alpha, beta, focus), and then the sparsity is what the rule gives.

Methods that only rank neurons are a scorer (one score per neuron and layer, higher = keep) plus
`plan_from_scores`. Statistics of the unpruned model (similarities, activations, weight norms) are cached on
the Calibration, so a sweep computes them once and shares them between methods and sparsities.

The methods:
  random      the paper's baseline: random neurons, the same fraction per layer, but the anatomy's important
              neurons (signed similarity above 0.35 with the final readout state, for any calibration input)
              are always kept (`protect=False` switches that off).
  magnitude   ||input rows|| x ||output column|| of each neuron's weights (no data).
  strategy    the paper's threshold rule (section 3.4; see `strategy_thresholds`).
  activation  mean |activation| of each neuron over the real (non-padding) tokens of the calibration reviews.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .data import batches, to_device
from .errors import UserError
from .families import base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from .models import Loaded
from .plan import PruningPlan, check_sparsity, plan_from_scores, round_up

log = logging.getLogger(__name__)

PROTECT_THRESHOLD = 0.35  # the paper's "high cosine similarity": such neurons are the anatomy's important ones
PAPER_DEPTH = 12          # BERT-base and GPT-2, where the paper's focusing layers were chosen
PAPER_FOCUS = {"encoder": (4, 6, 8, 10, 11), "decoder": (11,)}  # Figure 5a, blocks counted from 0
PAPER_BETA = 0.001        # Figure 5a's BERT rows (most use 0.001)
FOCUS_FACTOR = 3.0        # "we make alpha three times higher" on the focusing layers


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


PlanFn = Callable[..., PruningPlan]  # (calib: Calibration, sparsity: float | None, **params) -> PruningPlan


@dataclass(frozen=True)
class Method:
    name: str
    fn: PlanFn
    help: str
    needs_data: bool = True
    params: dict = field(default_factory=dict)  # parameter name -> default
    needs_sparsity: bool = True                 # False: its own parameters can set the sparsity (strategy)


METHODS: dict[str, Method] = {}


def register(name: str, help: str, needs_data: bool = True, needs_sparsity: bool = True,
             **params) -> Callable[[PlanFn], PlanFn]:
    def add(fn: PlanFn) -> PlanFn:
        METHODS[name] = Method(name, fn, help, needs_data, params, needs_sparsity)
        return fn
    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_plan(name: str, calib: Calibration, sparsity: float | None, **params) -> PruningPlan:
    """Run a registered method; the plan records the base model, method, parameters and seed.

    sparsity: the target fraction of all FFN neurons removed, or None for a method driven by its own
    parameters (strategy with alpha).
    """
    method = get_method(name)
    if sparsity is not None:
        check_sparsity(sparsity)
    elif method.needs_sparsity:
        raise UserError(f"method '{name}' needs a target sparsity (--sparsity F, F in [0, 1))")
    unknown = set(params) - set(method.params)
    if unknown:
        raise UserError(f"method '{name}' has no parameter(s) {sorted(unknown)}; it takes {sorted(method.params)}")
    plan = method.fn(calib, sparsity, **{**method.params, **params})
    plan.check_fits(calib.loaded.model)
    plan.base_model = plan.base_model or calib.loaded.base_spec
    plan.method = name
    plan.seed = calib.seed if plan.seed is None else plan.seed
    plan.params.setdefault("target_sparsity", sparsity)
    return plan


# --- statistics of the unpruned model, cached on the Calibration ----------------------------------

@torch.no_grad()
def forward_stats(calib: Calibration) -> dict:
    """One pass of the unpruned model over the calibration texts, for every data-driven statistic:

    states:    [n_inputs, L+1, d_model] readout states (anatomy.readout_states: CLS / last real token)
    act_mean:  per block [d_ff], mean |FFN activation| over the real (non-padding) tokens
    Hooks reduce each batch's activations to a per-neuron sum at once, so memory stays O(layers x d_ff).
    """
    def compute() -> dict:
        from .anatomy import readout_states
        from .hooks import capture_ffn_activations

        model = calib.loaded.model
        base = base_model(model)
        current: dict[str, Tensor] = {}

        def remember_mask(_mod, _args, kwargs):  # the batch's attention mask, for the reduce below
            current["mask"] = kwargs["attention_mask"]  # [batch, pos]
            current["tokens"] = current.get("tokens", 0) + int(kwargs["attention_mask"].sum())

        def reduce(x: Tensor) -> Tensor:  # x: [batch, pos, d_ff] -> [d_ff]
            m = current["mask"].to(x.dtype).unsqueeze(-1)  # [batch, pos, 1]
            return (x.abs() * m).sum(dim=(0, 1)).float().cpu()

        if not calib.texts:
            raise UserError("this method needs calibration texts; give --calib-size N with N > 0")
        handle = base.register_forward_pre_hook(remember_mask, with_kwargs=True)
        try:
            with capture_ffn_activations(model, reduce=reduce) as acts:
                states = readout_states(calib.loaded, calib.texts, calib.max_length, calib.batch_size)
        finally:
            handle.remove()
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
        from .anatomy import layer_similarity, neuron_similarity

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


def magnitude_scores(loaded: Loaded) -> list[Tensor]:
    """Per neuron: L2 norm of its input weights (all up / gate rows) times the norm of its output column."""
    base = base_model(loaded.model)
    scores = []
    for site in ffn_sites(loaded.model):
        w_in = torch.cat([weight_out_in(get_module(base, p)).detach() for p in site.up], dim=1)  # [d_ff, k*d]
        w_out = weight_out_in(get_module(base, site.down)).detach()  # [d_model, d_ff]
        scores.append((w_in.float().norm(dim=1) * w_out.float().norm(dim=0)).cpu())
    return scores


def _selection(allocation: str, floor: float, multiple_of: int) -> dict:
    return {"allocation": allocation, "floor": floor, "multiple_of": int(multiple_of)}


# --- the paper's baseline and two rankings -------------------------------------------------------

@register("random", "random neurons (the paper's baseline), same fraction per layer, keeping the anatomy's "
          "important neurons (similarity > 0.35 for any calibration input) unless protect=False",
          protect=True, threshold=PROTECT_THRESHOLD, allocation="local", floor=0.0, multiple_of=1)
def random_method(calib: Calibration, sparsity: float, protect: bool = True, threshold: float = PROTECT_THRESHOLD,
                  allocation: str = "local", floor: float = 0.0, multiple_of: int = 1) -> PruningPlan:
    g = torch.Generator().manual_seed(calib.seed)
    scores = [torch.rand(w, generator=g) for w in ffn_widths(calib.loaded.model)]
    keep = important_neurons(calib, threshold) if protect else None
    params = {"protect": bool(protect)}
    if protect:
        params.update(threshold=threshold, protected_per_layer=[len(k) for k in keep],
                      calib_inputs=similarity_stats(calib)["n_inputs"])
    return plan_from_scores(scores, sparsity, protect=keep, seed=calib.seed, params=params,
                            **_selection(allocation, floor, multiple_of))


@register("magnitude", "weight norm of each neuron (input rows x output column); no data",
          needs_data=False, allocation="local", floor=0.0, multiple_of=1)
def magnitude_method(calib: Calibration, sparsity: float, allocation: str = "local", floor: float = 0.0,
                     multiple_of: int = 1) -> PruningPlan:
    scores = calib.cached("magnitude", lambda: magnitude_scores(calib.loaded))
    return plan_from_scores(scores, sparsity, **_selection(allocation, floor, multiple_of))


@register("activation", "mean |activation| of each neuron over the calibration reviews' real tokens",
          allocation="local", floor=0.0, multiple_of=1)
def activation_method(calib: Calibration, sparsity: float, allocation: str = "local", floor: float = 0.0,
                      multiple_of: int = 1) -> PruningPlan:
    return plan_from_scores(activation_stats(calib), sparsity, params={"calib_inputs": len(calib.texts)},
                            **_selection(allocation, floor, multiple_of))


# --- the paper's strategy -------------------------------------------------------------------------

def default_focus(n_layers: int, decoder: bool) -> list[int]:
    """The paper's focusing layers, chosen on 12 blocks, mapped by relative depth to `n_layers` blocks:
    block f of 12 becomes round(f / 11 * (n_layers - 1)), so the first and last blocks stay first and last
    (BERT's 4,6,8,10,11 -> 2,3,4,5 on 6 blocks; GPT-2's 11 -> the last block)."""
    return map_focus(PAPER_FOCUS["decoder" if decoder else "encoder"], n_layers)


def map_focus(focus: Sequence[int], n_layers: int, depth: int = PAPER_DEPTH) -> list[int]:
    """Blocks given for a `depth`-block model, mapped by relative depth to an `n_layers`-block one."""
    if n_layers == depth:
        return sorted(set(int(f) for f in focus))
    return sorted({min(n_layers - 1, int(round(f / max(1, depth - 1) * (n_layers - 1)))) for f in focus})


def _check_focus(focus: Sequence[int], n_layers: int) -> list[int]:
    bad = [f for f in focus if not 0 <= int(f) < n_layers]
    if bad:
        raise UserError(f"focus layers {bad} are outside the model's blocks 0..{n_layers - 1}")
    return sorted(set(int(f) for f in focus))


def strategy_thresholds(layer_sim: Tensor, alpha: float, beta: float, focus: Sequence[int],
                        decoder: bool) -> Tensor:
    """The paper's per-block pruning thresholds: [n_layers].

    encoder: t_i = |layer_sim[i] * alpha * f_i + i * beta|;  decoder: t_i = |layer_sim[i] * alpha * f_i|,
    with f_i = 3 on the focusing blocks and 1 elsewhere. layer_sim[i] is the mean layer similarity of the
    readout state *entering* block i (index 0 = embeddings), the pairing the paper's Figure 4a numbers show
    (GPT-2's block 0 gets the embeddings' negative similarity).
    """
    n = len(layer_sim) - 1  # layer_sim: [L+1]
    f = torch.ones(n, dtype=torch.float64)
    f[list(focus)] = FOCUS_FACTOR
    t = layer_sim[:n].double() * alpha * f
    if not decoder:
        t = t + torch.arange(n, dtype=torch.float64) * beta
    return t.abs()


def _strategy_count(m: list[Tensor], t: Tensor) -> int:
    return sum(int((mi < ti).sum()) for mi, ti in zip(m, t.tolist()))


def solve_alpha(m: list[Tensor], layer_sim: Tensor, n_remove: int, beta: float, focus: Sequence[int],
                decoder: bool, iters: int = 80) -> float:
    """Smallest alpha (to bisection precision) at which the rule prunes at least `n_remove` neurons."""
    if n_remove <= 0:
        return 0.0
    count = lambda a: _strategy_count(m, strategy_thresholds(layer_sim, a, beta, focus, decoder))  # noqa: E731
    lo, hi = 0.0, 1e-3
    while count(hi) < n_remove:
        lo, hi = hi, hi * 2
        if hi > 1e9:
            raise UserError(f"the strategy cannot remove {n_remove} neurons with beta={beta} and focus={list(focus)} "
                            "(some layers' similarity is 0); lower the sparsity")
    for _ in range(iters):
        mid = (lo + hi) / 2
        if count(mid) >= n_remove:
            hi = mid
        else:
            lo = mid
    return hi


def _keep_by_counts(scores: Sequence[Tensor], counts: Sequence[int]) -> list[list[int]]:
    """Per layer, the `counts[i]` highest-scoring neuron ids."""
    return [sorted(torch.argsort(s, descending=True, stable=True)[:n].tolist()) for s, n in zip(scores, counts)]


@register("strategy", "the paper's threshold rule on mean |neuron similarity| (alpha solved for the "
          "target sparsity, or given with beta and focus)", needs_sparsity=False,
          alpha=None, beta=None, focus=None, multiple_of=1)
def strategy_method(calib: Calibration, sparsity: float | None, alpha: float | None = None,
                    beta: float | None = None, focus: Sequence[int] | None = None,
                    multiple_of: int = 1) -> PruningPlan:
    """Prune neuron j of block i when mean_inputs |neuron_sim_ij| < t_i (see `strategy_thresholds`).

    The similarities are averaged over the calibration texts (a pinned sample of training reviews, or plain
    text for a causal LM): neuron_sim per input is the cosine of the neuron's output vector with that input's
    final readout state (CLS / last real token), and its absolute value is averaged over inputs.
    With a target sparsity, alpha is solved by bisection; the rule's count then lands on the target or
    just above it (ties), and exactly the target number is removed: those furthest below their threshold.
    """
    decoder = calib.loaded.family.decoder
    stats = similarity_stats(calib)
    m, layer_sim = stats["neuron_abs"], stats["layer_sim"]
    n_layers = len(m)
    if decoder and beta not in (None, 0, 0.0):
        raise UserError("beta is part of the encoder rule only; the decoder rule is |neuron_sim| < |layer_sim * alpha|")
    beta = 0.0 if decoder else (PAPER_BETA if beta is None else float(beta))
    focus = default_focus(n_layers, decoder) if focus is None else _check_focus(focus, n_layers)
    widths = [int(x.numel()) for x in m]
    total = sum(widths)
    if alpha is not None and sparsity is not None:
        raise UserError("give the strategy either a target sparsity or alpha, not both")
    if alpha is None and sparsity is None:
        raise UserError("the strategy needs a target sparsity (--sparsity) or its alpha (--alpha)")
    solved = alpha is None
    if solved:
        n_remove = int(round(sparsity * total))
        alpha = solve_alpha(m, layer_sim, n_remove, beta, focus, decoder)
    elif not math.isfinite(float(alpha)) or float(alpha) < 0:
        raise UserError(f"alpha must be a non-negative number, got {alpha}")
    t = strategy_thresholds(layer_sim, float(alpha), beta, focus, decoder)
    margin = [(ti - mi.double()) for mi, ti in zip(m, t.tolist())]  # > 0: below the threshold, pruned
    rule_removed = [int((g > 0).sum()) for g in margin]
    if solved:
        # the n_remove neurons furthest below their layer's threshold (one global order of margins)
        flat = torch.cat(margin)
        order = torch.argsort(flat, descending=True, stable=True)[:n_remove]
        layer_of = torch.repeat_interleave(torch.arange(n_layers), torch.tensor(widths))
        removed = torch.bincount(layer_of[order], minlength=n_layers).tolist()
    else:
        removed = rule_removed
    counts = [round_up(w - r, multiple_of, w) for w, r in zip(widths, removed)]
    keep = _keep_by_counts([-g for g in margin], counts)  # keep the neurons least below (most above) threshold
    params = {"alpha": float(alpha), "alpha_solved": solved, "beta": beta, "focus": focus,
              "rule": "decoder" if decoder else "encoder", "thresholds": [round(x, 8) for x in t.tolist()],
              "layer_sim": [round(float(x), 6) for x in layer_sim.tolist()], "rule_removed_per_layer": rule_removed,
              "calib_inputs": stats["n_inputs"], "similarity": "mean over calibration inputs of |neuron_sim|"}
    if multiple_of > 1:
        params["multiple_of"] = int(multiple_of)
    return PruningPlan(keep=keep, widths=widths, params=params, seed=calib.seed)

from . import calibrated  # noqa: E402,F401  registers "calibrated"
