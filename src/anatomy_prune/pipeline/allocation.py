"""Allocation: how a request turns scores into a plan (local or global ranking, a floor per layer, rounding
to a multiple), checked when built; a method that allocates itself takes the options it names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import UserError
from ..scores.registry import get_scorer
from ..validate import fraction, one_of, optional, positive_int

SCOPES = ("local", "global")
MAX_MULTIPLE = 1 << 16
ALLOCATION_KEYS = ("allocation", "floor", "multiple_of")   # their names as method parameters (TOML rows, CLI)


def _set(obj, **values) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)


@dataclass(frozen=True)
class Allocation:
    """How scores become a plan: local or global ranking, the least fraction a layer keeps, rounding.
    None: the method's own choice (local for most, global with an automatic floor for calibrated)."""

    scope: str | None = None
    floor: float | None = None
    multiple_of: int = 1

    def __post_init__(self) -> None:
        _set(self, scope=optional(one_of, self.scope, SCOPES, "--allocation"),
             floor=optional(fraction, self.floor, "--floor", closed=True),
             multiple_of=positive_int(self.multiple_of, "--multiple-of", MAX_MULTIPLE))

    @classmethod
    def split_params(cls, params: Mapping) -> tuple[dict, "Allocation | None"]:
        """Method parameters that carry allocation options (a TOML row, the old keyword API) -> (the
        method's own parameters, the Allocation they name, or None)."""
        own = {k: v for k, v in params.items() if k not in ALLOCATION_KEYS}
        given = {k: params[k] for k in ALLOCATION_KEYS if k in params}
        if not given:
            return own, None
        return own, cls(scope=given.get("allocation"), floor=given.get("floor"),
                        multiple_of=given.get("multiple_of", 1))

    def given(self) -> dict:
        """The options given, by their parameter names (allocation, floor, multiple_of)."""
        given = {"allocation": self.scope, "floor": self.floor, "multiple_of": self.multiple_of}
        return {k: v for k, v in given.items() if v is not None and not (k == "multiple_of" and v == 1)}

    def check_for(self, method: str) -> None:
        """Every option given is one `method` lets a request set."""
        refused = sorted(set(self.given()) - set(get_scorer(method).allocation_options))
        if refused:
            flags = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise UserError(f"method '{method}' takes no {flags} (its allocation is its own)")

    def override(self) -> dict:
        """The options given, as the allocator's (plan.allocate.check_allocation's keys)."""
        return {{"allocation": "kind"}.get(k, k): v for k, v in self.given().items()}
