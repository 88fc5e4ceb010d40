"""The scorer registry: a method turns calibration data into one score per prunable unit (higher = keep).

A scorer returns `Scores`: what it measured (values per neuron and head unit, units it must keep, its
parameters for the plan) and nothing else. How scores become a plan (allocation) and how the pruned model is
compensated are the pruning request's options (pipeline.allocation.resolve), so a scorer never sees them.
The built-in scorers register themselves here when the package is imported.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Callable

from torch import Tensor

from ..errors import UserError

@dataclass(frozen=True)
class Scores:
    """One scorer's verdict on every FFN neuron (and head unit, where it scores them)."""

    values: list[Tensor]                        # per layer [d_ff]; higher = keep
    params: dict = field(default_factory=dict)  # the method's parameters and diagnostics (go into plan.params)
    must_keep: list[list[int]] | None = None    # per layer, ids kept whatever their score (protected neurons)
    seed: int | None = None
    head_values: list[Tensor] | None = None     # per layer [head units], on the same scale as `values`


ScoreFn = Callable[..., Scores]  # (calib: Calibration, sparsity: float | None[, options]) -> Scores


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: ScoreFn
    help: str
    needs_data: bool = True
    params: dict = field(default_factory=dict)  # parameter name -> default
    needs_sparsity: bool = True                 # False: its own parameters can set the sparsity (strategy)
    stochastic: bool = False                    # True: its scores are random draws (its `seed` parameter)
    options: type | None = None                 # the frozen dataclass of its parameters (None: it takes none)

    def is_flag(self, name: str) -> bool:
        """Whether parameter `name` is true / false: its default is a bool, or its option is typed bool | None."""
        if isinstance(self.params.get(name), bool):
            return True
        kind = {f.name: f.type for f in fields(self.options)}.get(name) if self.options is not None else None
        return kind is bool or (isinstance(kind, str) and kind.replace(" ", "").split("|")[0] == "bool")

    def run(self, calib, sparsity: float | None, params: dict) -> Scores:
        """Score with `params` (checked by check_params) as the method's options object."""
        return self.fn(calib, sparsity) if self.options is None else self.fn(calib, sparsity, self.options(**params))


SCORERS: dict[str, Scorer] = {}


def register(name: str, help: str, needs_data: bool = True, needs_sparsity: bool = True, stochastic: bool = False,
             options: type | None = None) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scorer; its parameters and their defaults are the fields of `options` (a frozen dataclass)."""
    params = {} if options is None else {f.name: f.default for f in fields(options)}
    if any(v is MISSING for v in params.values()):
        raise TypeError(f"scorer '{name}': every option needs a default")

    def add(fn: ScoreFn) -> ScoreFn:
        SCORERS[name] = Scorer(name, fn, help, needs_data, params, needs_sparsity, stochastic, options)
        return fn
    return add


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def scorer_names() -> list[str]:
    return sorted(SCORERS)


def check_params(name: str, params: dict) -> dict:
    """The scorer's defaults updated with `params`; a parameter it does not take is a UserError."""
    scorer = get_scorer(name)
    unknown = set(params) - set(scorer.params)
    if unknown:
        raise UserError(f"method '{name}' has no parameter(s) {sorted(unknown)}; it takes {sorted(scorer.params)}")
    return {**scorer.params, **params}


def score(name: str, calib, sparsity: float | None, **params) -> Scores:
    """Run a registered scorer on a Calibration (its parameters checked first)."""
    scorer = get_scorer(name)
    if sparsity is None and scorer.needs_sparsity:
        raise UserError(f"method '{name}' needs a target sparsity (--sparsity F, F in [0, 1))")
    return scorer.run(calib, sparsity, check_params(name, params))
