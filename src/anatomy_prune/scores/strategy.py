"""The first paper's threshold strategy (section 3.4) as a scorer.

Neuron j of block i is pruned when its mean |similarity| with the final readout state is below the block's
threshold t_i (see `strategy_thresholds`). As a score: |sim_ij| - t_i, higher = keep. With a given alpha the
rule decides by itself (the request's default allocation is then threshold: keep score >= 0); with a target
sparsity alpha is solved by bisection so the rule removes at least that many, and exactly that many are
removed: those furthest below their threshold (by default one global ranking of the raw scores; see
pipeline.allocation.resolve).

The similarities are averaged over the calibration texts (a pinned sample of training reviews, or plain
text for a causal LM): neuron_sim per input is the cosine of the neuron's output vector with that input's
final readout state (CLS / last real token), and its absolute value is averaged over inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..validate import finite
from .calibration import Calibration, similarity_stats
from .registry import Scores, register

PAPER_DEPTH = 12          # BERT-base and GPT-2, where the paper's focusing layers were chosen
PAPER_FOCUS = {"encoder": (4, 6, 8, 10, 11), "decoder": (11,)}  # Figure 5a, blocks counted from 0
PAPER_BETA = 0.001        # Figure 5a's BERT rows (most use 0.001)
FOCUS_FACTOR = 3.0        # "we make alpha three times higher" on the focusing layers


FOCUS_MAPPINGS = ("depth", "coverage")


def default_focus(n_layers: int, decoder: bool, mapping: str = "depth") -> list[int]:
    """The paper's focusing layers, chosen on 12 blocks, mapped to `n_layers` blocks (see map_focus).
    The default is "depth": every focusing block keeps its relative depth, so none is lost and the first and
    last blocks stay first and last (BERT's 4,6,8,10,11 -> 2,3,4,5 on 6 blocks; GPT-2's 11 -> the last)."""
    return map_focus(PAPER_FOCUS["decoder" if decoder else "encoder"], n_layers, mapping=mapping)


def map_focus(focus: Sequence[int], n_layers: int, depth: int = PAPER_DEPTH, mapping: str = "depth") -> list[int]:
    """Blocks given for a `depth`-block model, mapped to an `n_layers`-block one. depth: block f goes to
    round(f / (depth - 1) * (n_layers - 1)), so every focusing block survives (BERT's 5 of 12 -> 4 of MiniLM's 6);
    coverage: the share of focused blocks is kept, k = round(len(focus) * n_layers / depth) blocks (at least
    one), those whose span of depth covers most focusing blocks, ties to the deeper (BERT's -> 3,4,5 of 6)."""
    if mapping not in FOCUS_MAPPINGS:
        raise UserError(f"unknown focus mapping '{mapping}'; choose one of {', '.join(FOCUS_MAPPINGS)}")
    focus = sorted(set(int(f) for f in focus))
    if n_layers == depth:
        return focus
    if mapping == "depth":
        return sorted({min(n_layers - 1, int(round(f / max(1, depth - 1) * (n_layers - 1)))) for f in focus})
    k = max(1, math.floor(len(focus) * n_layers / depth + 0.5)) if focus else 0
    covered = []
    for b in range(n_layers):
        lo, hi = b * depth / n_layers, (b + 1) * depth / n_layers
        covered.append(sum(max(0.0, min(hi, f + 1) - max(lo, f)) for f in focus))
    best = sorted(range(n_layers), key=lambda b: (-covered[b], -b))[:k]
    return sorted(b for b in best if covered[b] > 0)


def _check_focus(focus: Sequence[int], n_layers: int) -> list[int]:
    if isinstance(focus, (str, bytes)) or not all(isinstance(f, int) and not isinstance(f, bool) for f in focus):
        raise UserError(f"focus must be a list of block numbers, got {focus!r}")
    bad = [f for f in focus if not 0 <= int(f) < n_layers]
    if bad:
        raise UserError(f"focus layers {bad} are outside the model's blocks 0..{n_layers - 1}")
    return sorted(set(int(f) for f in focus))


def strategy_thresholds(layer_sim: Tensor, alpha: float, beta: float, focus: Sequence[int],
                        decoder: bool, signed: bool = False) -> Tensor:
    """The paper's per-block thresholds [n_layers]: encoder |layer_sim[i] * alpha * f_i + i * beta|, decoder
    |layer_sim[i] * alpha * f_i|, f_i = 3 on focusing blocks, layer_sim[i] the similarity of the state
    *entering* block i (index 0 = embeddings), as the paper's Figure 4a pairs them. signed (decoders): no abs(),
    so a block entered with a negative similarity (GPT-2's block 0) loses nothing, as Figure 4a shows."""
    n = len(layer_sim) - 1  # layer_sim: [L+1]
    f = torch.ones(n, dtype=torch.float64)
    f[list(focus)] = FOCUS_FACTOR
    t = layer_sim[:n].double() * alpha * f
    if not decoder:
        t = t + torch.arange(n, dtype=torch.float64) * beta
    return t if (signed and decoder) else t.abs()


def _strategy_count(m: list[Tensor], t: Tensor) -> int:
    return sum(int((mi < ti).sum()) for mi, ti in zip(m, t.tolist()))


def solve_alpha(m: list[Tensor], layer_sim: Tensor, n_remove: int, beta: float, focus: Sequence[int],
                decoder: bool, iters: int = 80, signed: bool = False) -> float:
    """Smallest alpha (to bisection precision) at which the rule prunes at least `n_remove` neurons."""
    if n_remove <= 0:
        return 0.0
    count = lambda a: _strategy_count(m, strategy_thresholds(layer_sim, a, beta, focus, decoder, signed))  # noqa: E731
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


@dataclass(frozen=True)
class StrategyOptions:
    """The strategy's options: alpha (None: solved for the target sparsity), beta and focus (None: the paper's),
    and the ablations (rule, focus_mapping, signed; see strategy_scores)."""

    alpha: float | None = None
    beta: float | None = None
    focus: Sequence[int] | None = None
    rule: str = "paper"
    focus_mapping: str = "depth"
    signed: bool = False

    def __post_init__(self) -> None:
        if self.rule not in ("paper", "uniform"):
            raise UserError(f"unknown strategy rule '{self.rule}'; choose paper or uniform")


@register("strategy", "the paper's threshold rule on mean |neuron similarity| (alpha solved for the "
          "target sparsity, or given with beta and focus)", needs_sparsity=False, options=StrategyOptions)
def strategy_scores(calib: Calibration, sparsity: float | None, opts: StrategyOptions = StrategyOptions()) -> Scores:
    """Scores |sim| - t (double); the request's default allocation reproduces the paper's rule (module doc).
    Ablations: rule="uniform" scores |sim| alone (by default the same fraction of every layer goes); focus=[]
    drops the focusing layers; focus_mapping="coverage" maps them by depth covered; signed=True drops the abs()."""
    alpha, beta, focus = opts.alpha, opts.beta, opts.focus
    rule, focus_mapping, signed = opts.rule, opts.focus_mapping, opts.signed
    decoder = calib.loaded.family.decoder
    stats = similarity_stats(calib)
    m, layer_sim = stats["neuron_abs"], stats["layer_sim"]
    n_layers = len(m)
    if decoder and beta not in (None, 0, 0.0):
        raise UserError("beta is part of the encoder rule only; the decoder rule is |neuron_sim| < |layer_sim * alpha|")
    beta = 0.0 if decoder else (PAPER_BETA if beta is None else finite(beta, "beta"))
    if rule == "uniform":
        if sparsity is None:
            raise UserError("the uniform rule needs a target sparsity")
        return Scores([x.double() for x in m], {"rule": "uniform", "calib_inputs": stats["n_inputs"],
                                                "similarity": "mean over calibration inputs of |neuron_sim|"},
                      seed=calib.seed)
    focus = default_focus(n_layers, decoder, focus_mapping) if focus is None else _check_focus(focus, n_layers)
    total = sum(int(x.numel()) for x in m)
    if alpha is not None and sparsity is not None:
        raise UserError("give the strategy either a target sparsity or alpha, not both")
    if alpha is None and sparsity is None:
        raise UserError("the strategy needs a target sparsity (--sparsity) or its alpha (--alpha)")
    solved = alpha is None
    if solved:
        alpha = solve_alpha(m, layer_sim, int(round(sparsity * total)), beta, focus, decoder, signed=signed)
    else:
        alpha = finite(alpha, "alpha", 0.0)
    t = strategy_thresholds(layer_sim, float(alpha), beta, focus, decoder, signed=bool(signed))
    values = [mi.double() - ti for mi, ti in zip(m, t.tolist())]  # < 0: below the threshold, pruned by the rule
    params = {"alpha": float(alpha), "alpha_solved": solved, "beta": beta, "focus": focus,
              "focus_mapping": focus_mapping, "signed": bool(signed) and decoder,
              "rule": "decoder" if decoder else "encoder", "thresholds": [round(x, 8) for x in t.tolist()],
              "layer_sim": [round(float(x), 6) for x in layer_sim.tolist()],
              "rule_removed_per_layer": [int((v < 0).sum()) for v in values],
              "calib_inputs": stats["n_inputs"], "similarity": "mean over calibration inputs of |neuron_sim|"}
    return Scores(values, params, seed=calib.seed)

