"""The one set of input checks: each returns the clean value or raises a one-line UserError naming `what`.

A leaf module (no torch). Booleans are never numbers here, NaN and infinities are never in range.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Sequence

from .errors import UserError

SEED_MAX = 2**32 - 1   # seeds must fit numpy's and torch's 32-bit generators


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def whole(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number (an int, not a bool, not 2.0) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{what} must be a whole number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise UserError(f"{what} must be a whole number {bounds}, got {value}")
    return value


def positive_int(value: Any, what: str, hi: int | None = None) -> int:
    """A whole number >= 1 (and at most `hi`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (hi is not None and value > hi):
        limit = f" and at most {hi}" if hi is not None else ""
        raise UserError(f"{what} must be a positive whole number{limit}, got {value!r}")
    return value


def flag(value: Any, what: str) -> bool:
    """A true / false setting (a TOML boolean or a Python bool; never 0 / 1 or a string)."""
    if not isinstance(value, bool):
        raise UserError(f"{what} must be true or false, got {value!r}")
    return value


def optional(check, value: Any, *args, **kwargs):
    """None stays None; anything else goes through `check`."""
    return None if value is None else check(value, *args, **kwargs)


def finite(value: Any, what: str, lo: float | None = None, hi: float | None = None, *,
           strict_lo: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with strict_lo); text, NaN and infinities are refused."""
    if not _is_number(value) or not math.isfinite(float(value)):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    v = float(value)
    if (lo is not None and (v < lo or (strict_lo and v == lo))) or (hi is not None and v > hi):
        low = "" if lo is None else f"{'>' if strict_lo else '>='} {lo:g}"
        high = "" if hi is None else f"<= {hi:g}"
        raise UserError(f"{what} must be {' and '.join(s for s in (low, high) if s)}, got {v:g}")
    return v


def fraction(value: Any, what: str, *, closed: bool = False) -> float:
    """A fraction in [0, 1) (closed=True: [0, 1])."""
    if not _is_number(value) or math.isnan(float(value)):
        raise UserError(f"{what} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    v = float(value)
    if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        raise UserError(f"{what} must be in [0, 1{']' if closed else ')'}, got {value}")
    return v


def seed32(value: Any, what: str = "--seed") -> int:
    """A seed: a whole number in [0, 2**32 - 1]."""
    return whole(value, what, 0, SEED_MAX)


def one_of(value: Any, choices: Sequence, what: str) -> Any:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def text(value: Any, what: str) -> str:
    """Non-empty text."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{what} must be non-empty text, got {value!r}")
    return value


def known_keys(given: Iterable[str], known: Sequence[str], where: str) -> None:
    """Every key is a known one; an unknown key is named with the nearest known key."""
    for key in given:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; known: {', '.join(known)}"
            raise UserError(f"{where}: unknown key '{key}'{hint}")
