"""Allocation: how a request turns scores into a plan (local, global or threshold; a floor per layer; the
normalisation of a global ranking; rounding to a multiple; the fraction of head units removed), checked when
built, and `resolve`: every method's defaults (allocation and compensation recipe) in one place."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, NamedTuple

from ..errors import UserError
from ..linalg import DEFAULT_RIDGE
from ..plan.allocate import KINDS as SCOPES, MAX_MULTIPLE, NORMALIZE
from ..scores.calibrated import DEFAULT_READOUT_MIX, auto_floor
from ..scores.registry import get_scorer
from ..validate import fraction, one_of, optional, positive_int
from .compensation import COMPENSATION_KEYS, Compensation, recorded, tune_default

ALLOCATION_KEYS = ("allocation", "floor", "normalize", "multiple_of", "head_sparsity")  # as method parameters
OWN_ALLOCATION = {"strategy": ("multiple_of",),  # methods whose allocation is their own: the options they take
                  "calibrated": ("floor", "normalize", "multiple_of", "head_sparsity")}


def _set(obj, **values) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)


@dataclass(frozen=True)
class Allocation:
    """How scores become a plan: scope (local, global, threshold), the least fraction a layer keeps, the
    global ranking's normalisation (none, mean, standard), rounding, the fraction of head units removed.
    None: the method's default (see resolve)."""

    scope: str | None = None
    floor: float | None = None
    multiple_of: int = 1
    normalize: str | None = None
    head_sparsity: float | None = None

    def __post_init__(self) -> None:
        _set(self, scope=optional(one_of, self.scope, SCOPES, "--allocation"),
             floor=optional(fraction, self.floor, "--floor", closed=True),
             multiple_of=positive_int(self.multiple_of, "--multiple-of", MAX_MULTIPLE),
             normalize=optional(one_of, self.normalize, NORMALIZE, "--normalize"),
             head_sparsity=optional(fraction, self.head_sparsity, "--head-sparsity"))

    @classmethod
    def from_params(cls, given: Mapping) -> "Allocation":
        """The allocation named by method parameters (allocation, floor, normalize, multiple_of, head_sparsity)."""
        return cls(scope=given.get("allocation"), floor=given.get("floor"), multiple_of=given.get("multiple_of", 1),
                   normalize=given.get("normalize"), head_sparsity=given.get("head_sparsity"))

    def given(self) -> dict:
        """The options given, by their parameter names."""
        given = {"allocation": self.scope, "floor": self.floor, "multiple_of": self.multiple_of,
                 "normalize": self.normalize, "head_sparsity": self.head_sparsity}
        return {k: v for k, v in given.items() if v is not None and not (k == "multiple_of" and v == 1)}

    def only(self, keys) -> "Allocation":
        """The options among `keys` (parameter names), the others left to the method."""
        return Allocation.from_params({k: v for k, v in self.given().items() if k in keys})

    def override(self) -> dict:
        """The options given, as the allocator's (plan.allocate.check_allocation's keys)."""
        return {{"allocation": "kind"}.get(k, k): v for k, v in self.given().items()}

    def record(self) -> dict:
        """What a run folder records: scope, floor, multiple_of (and normalize, head_sparsity when given)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if k in ("scope", "floor", "multiple_of") or v is not None}


class Split(NamedTuple):
    """Method parameters split: the method's own, the Allocation and the Compensation they name (or None)."""

    params: dict
    allocation: Allocation | None
    compensation: Compensation | None


def split_params(params: Mapping) -> Split:
    """Method parameters that carry allocation or compensation options (a TOML row, the CLI, the old keyword
    API) -> the method's own parameters, the Allocation and the Compensation they name."""
    request_keys = ALLOCATION_KEYS + COMPENSATION_KEYS
    own = {k: v for k, v in params.items() if k not in request_keys}
    alloc = {k: params[k] for k in ALLOCATION_KEYS if k in params}
    comp = {k: params[k] for k in COMPENSATION_KEYS if k in params}
    return Split(own, Allocation.from_params(alloc) if alloc else None,
                 Compensation.from_params(comp) if comp else None)


def takes(method: str) -> tuple[str, ...]:
    """The request options (by parameter name) `method` lets a request set: a method whose allocation is
    its own takes those it names; the others take all (head_sparsity where they can score heads)."""
    alloc = OWN_ALLOCATION.get(method)
    if alloc is None:
        heads = "heads" in get_scorer(method).params
        alloc = tuple(k for k in ALLOCATION_KEYS if heads or k != "head_sparsity")
    return alloc + COMPENSATION_KEYS


def check_for(method: str, allocation: Allocation, compensation: Compensation | None = None) -> None:
    """Every option given is one `method` lets a request set (see takes)."""
    given = set(allocation.given()) | set(compensation.given() if compensation is not None else ())
    refused = sorted(given - set(takes(method)))
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise UserError(f"method '{method}' takes no {flags} (its allocation is its own)")


class Resolved(NamedTuple):
    """A request's allocation (the allocator's dict), compensation recipe (None: none) and what the plan
    records beside the allocator's own entries (the method's recipe, whether its floor was automatic)."""

    allocation: dict
    recipe: dict | None
    record: dict


def _defaults(method: str, options: Mapping, sparsity: float | None, readout: bool, causal: bool = False
              ) -> tuple[dict, dict | None, dict]:
    """A method's own allocation, compensation recipe and plan entries, before the request's options."""
    if method == "strategy":
        if options.get("rule") == "uniform":
            return {"kind": "local"}, None, {}
        solved = options.get("alpha") is None   # from a sparsity: exactly that many, furthest below threshold
        return ({"kind": "global", "normalize": "none", "floor": 0.0} if solved else {"kind": "threshold"}), None, {}
    if method == "calibrated":
        recipe = {"kind": "refit", "ridge": DEFAULT_RIDGE, "readout_mix": DEFAULT_READOUT_MIX if readout else 0.0,
                  "tune": tune_default(causal)}
        floor = auto_floor(sparsity if sparsity is not None else 0.0)
        return {"kind": "global", "normalize": "none", "floor": floor}, recipe, {"floor_auto": True}
    if method == "fluctuation":   # FLAP's: standardised per layer, one global ranking, means into biases
        return {"kind": "global", "normalize": "standard", "floor": 0.0}, {"kind": "bias"}, {}
    return {"kind": "local"}, None, {}


def resolve(method: str, options: Mapping, sparsity: float | None, allocation: Allocation,
            compensation: Compensation | None, readout: bool = False, causal: bool = False) -> Resolved:
    """The allocation and compensation a request gets: the method's defaults (random, magnitude, activation:
    local; strategy: threshold with alpha, global raw ranking without a floor when alpha is solved, local for
    rule=uniform; calibrated: global raw ranking above auto_floor(sparsity), refit with DEFAULT_RIDGE and, on a
    classifier's readout token, DEFAULT_READOUT_MIX; fluctuation: FLAP's standardised global ranking and bias
    compensation), each overridden by what the request gives.
    options: the method's checked parameters; readout: the model reads out one token (a classifier); causal: a
    causal LM (calibrated then tunes the output projections toward the dense stream, compensation.tune_default)."""
    alloc, recipe, record = _defaults(method, options, sparsity, readout, causal)
    if "floor_auto" in record:
        record["floor_auto"] = allocation.floor is None
    own = recipe is not None        # the method chose a recipe: its plan records it (with the request's options)
    if compensation is not None:
        recipe = compensation.over(recipe, readout)
    if own:
        record.update(recorded(recipe))
    return Resolved({**alloc, **allocation.override()}, recipe and {**recipe, "own": own}, record)
