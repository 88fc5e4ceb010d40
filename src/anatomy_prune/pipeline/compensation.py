"""Compensation: the recipe a request asks for (refit: ridge least squares of removed inputs from kept ones;
bias: each removed input's mean folded into the output projection's bias; tune: then every sublayer's output
projection refitted toward the dense model's residual stream, apply.tune), and the recipe a plan replays."""
from __future__ import annotations

from dataclasses import dataclass

from ..apply.compensate import check_recipe
from ..errors import UserError
from ..linalg import DEFAULT_RIDGE
from ..plan.plan import PruningPlan
from ..validate import finite, flag, fraction, one_of, optional

KINDS = ("refit", "bias")
COMPENSATION_KEYS = ("compensation", "ridge", "readout_mix", "tune")   # their names as method parameters (TOML, CLI)


def tune_default(causal: bool) -> bool:
    """Whether `calibrated` tunes the output projections toward the dense stream unless told: for a causal LM
    (measured: SmolLM2-135M, README); an encoder classifier's held-out accuracy did not gain."""
    return bool(causal)


@dataclass(frozen=True)
class Compensation:
    """How a request compensates: kind refit (ridge least squares) or bias (means into biases); None, for
    any field, is the method's default (refit with ridge DEFAULT_RIDGE and readout_mix 0 where it has none)."""

    kind: str | None = None
    ridge: float | None = None
    readout_mix: float | None = None
    tune: bool | None = None

    def __post_init__(self) -> None:
        optional(one_of, self.kind, KINDS, "--compensation")
        optional(flag, self.tune, "tune")
        object.__setattr__(self, "ridge", optional(finite, self.ridge, "ridge", 0.0, 1e6))
        object.__setattr__(self, "readout_mix", optional(fraction, self.readout_mix, "readout_mix", closed=True))
        if self.kind == "bias" and (self.ridge is not None or self.readout_mix is not None):
            raise UserError("bias compensation folds means into biases; it takes no ridge and no readout_mix")

    @classmethod
    def from_params(cls, given: dict) -> "Compensation":
        """The recipe named by method parameters (compensation, ridge, readout_mix)."""
        return cls(kind=given.get("compensation"), ridge=given.get("ridge"), readout_mix=given.get("readout_mix"),
                   tune=given.get("tune"))

    def given(self) -> dict:
        """The options given, by their parameter names (compensation, ridge, readout_mix, tune)."""
        given = {"compensation": self.kind, "ridge": self.ridge, "readout_mix": self.readout_mix, "tune": self.tune}
        return {k: v for k, v in given.items() if v is not None}

    def over(self, recipe: dict | None, readout: bool = True) -> dict:
        """This request's recipe over a default one (None: plain least squares without readout weight);
        readout=False: the model reads out no single token, so readout_mix is 0 whatever is asked."""
        if recipe is None and self == NO_TUNE:
            return None              # --no-tune alone asks for no compensation where the method has none
        base = recipe or {"kind": "refit"}
        tune = base.get("tune", False) if self.tune is None else self.tune
        if (self.kind or base["kind"]) == "bias":
            return {"kind": "bias", "tune": tune}
        if base["kind"] != "refit":
            base = {"kind": "refit"}
        ridge = base.get("ridge", DEFAULT_RIDGE) if self.ridge is None else self.ridge
        mix = base.get("readout_mix", 0.0) if self.readout_mix is None else self.readout_mix
        return {"kind": "refit", "ridge": ridge, "readout_mix": mix if readout else 0.0, "tune": tune}


NO_TUNE = Compensation(tune=False)


def recorded(recipe: dict) -> dict:
    """A method's own recipe as its plan records it (plan.params), so a saved plan replays the same way."""
    tuned = {"tune": True} if recipe.get("tune") else {}
    if recipe["kind"] == "bias":
        return {"compensate": True, "compensation": "bias", **tuned}
    return {"compensate": True, "ridge": recipe["ridge"], "readout_mix": recipe["readout_mix"], **tuned}


def compensation_recipe(plan: PruningPlan, requested: Compensation | bool | None) -> dict | None:
    """Whether and how to compensate `plan`: the recipe it records (plan.params: compensate, compensation,
    ridge, readout_mix; older plans marked `compensated` too) with the request's options over it, or the
    request's over plain least squares (a plan's ridge still counts). Returns {kind, ridge, readout_mix, own}
    (own: the plan's method chose it) or None."""
    requested = Compensation() if requested is True else (requested or None)
    p = plan.params
    own = bool(p.get("compensate")) or bool(p.get("compensated"))
    if requested == NO_TUNE and not own:
        return None
    if not (own or requested is not None):
        return None
    ridge, mix = check_recipe(p.get("ridge", DEFAULT_RIDGE), p.get("readout_mix", 0.0) if own else 0.0)
    kind = one_of(p.get("compensation", "refit"), KINDS, "the plan's compensation") if own else "refit"
    tune = flag(p.get("tune", False), "the plan's tune") if own else False
    recipe = (requested or Compensation()).over({"kind": kind, "ridge": ridge, "readout_mix": mix, "tune": tune})
    return {"ridge": DEFAULT_RIDGE, "readout_mix": 0.0, **recipe, "own": own}
