"""The sweep's TOML: a grid of rows (`[[row]]`: method, family, sparsity or method parameters, label) and a
whole sweep described by one file (`SweepConfig.from_toml`); every key, type and range checked before any
model loads, an unknown key named with the nearest known one."""
from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..models.families import ffn_sites
from ..models.loading import Loaded
from ..resources import config_path
from ..safefiles import read_document
from ..scores.registry import check_params, get_scorer
from ..scores.strategy import map_focus
from ..validate import flag, fraction, known_keys, one_of, whole
from .allocation import Allocation, check_for, split_params, takes

ROW_KEYS = ("method", "family", "sparsity", "label")
FAMILIES = ("encoder", "decoder", "any")
GRID_KEYS = ("focus_depth", "row")
MAX_DEPTH = 1000


def parse_list(text: str | Sequence, what: str, cast=str) -> list:
    """'a,b,c' (or a list) -> [cast(a), ...]; a one-line UserError for an item that is not a `what`."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s != ""]
    try:
        return [cast(s) for s in items]
    except (TypeError, ValueError):
        raise UserError(f"--{what}: expected a comma-separated list, got '{text}'") from None


def read_toml(path: str | Path) -> dict:
    """A TOML file (a bare name that is not a file finds a config shipped with the package)."""
    p = Path(path)
    if not p.is_file():
        p = config_path(p.name)
    return read_document(p, tomllib.loads, "config file", "TOML")


def load_grid(path: str | Path) -> dict:
    """A sweep grid: `focus_depth` and `[[row]]` tables, checked (see check_grid)."""
    return check_grid(read_toml(path), str(path))


def check_grid(cfg: dict, where: str) -> dict:
    """focus_depth (the depth `focus` blocks are given for) and rows, each with a registered method, a family
    (encoder / decoder / any), a sparsity or the method's parameters with values of the right type."""
    rows = cfg.get("row")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"config file '{where}' has no [[row]] tables")
    whole(cfg.get("focus_depth", 12), f"config '{where}': focus_depth", 1, MAX_DEPTH)
    for i, row in enumerate(rows, 1):
        at = f"config '{where}' row {i}"
        if not isinstance(row.get("method"), str):
            raise UserError(f"{at} has no method")
        scorer = get_scorer(row["method"])
        known_keys(row, ROW_KEYS + tuple(scorer.params) + takes(row["method"]), at)
        one_of(row.get("family", "encoder"), FAMILIES, f"{at}: family")
        if "sparsity" in row:
            fraction(row["sparsity"], f"{at}: sparsity")
        try:
            params, alloc, comp = split_params({k: v for k, v in row.items() if k not in ROW_KEYS})
            check_params(row["method"], params)
            check_for(row["method"], alloc or Allocation(), comp)
        except UserError as exc:
            raise UserError(f"{at}: {exc}") from None
        for k, v in params.items():
            _check_type(k, v, scorer.params.get(k), at, scorer.is_flag(k))
    return cfg


def _check_type(key: str, value: Any, default: Any, at: str, is_flag: bool = False) -> None:
    """A row's parameter has its default's type: focus a list of block numbers, a flag (a bool default, or an
    option typed bool | None) true / false, text text, anything else a number."""
    if key == "focus":
        if not isinstance(value, list) or not all(isinstance(f, int) and not isinstance(f, bool) for f in value):
            raise UserError(f"{at}: focus must be a list of block numbers")
    elif is_flag:
        flag(value, f"{at}: {key}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{at}: {key} must be text, got {value!r}")
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{at}: {key} must be a number, got {value!r}")


def grid_points(cfg: dict, loaded: Loaded) -> list[dict]:
    """The grid's rows that apply to this model: {method, sparsity, params, label}; focus layers mapped."""
    family = "decoder" if loaded.family.decoder else "encoder"
    depth = int(cfg.get("focus_depth", 12))
    n_layers = len(ffn_sites(loaded.model))
    points = []
    for row in cfg["row"]:
        if row.get("family", "any") not in (family, "any"):
            continue
        params = {k: v for k, v in row.items() if k not in ROW_KEYS}
        if "focus" in params:
            params["focus"] = map_focus(params["focus"], n_layers, depth, mapping=params.get("focus_mapping", "depth"))
        label = row.get("label") or ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("method", "family"))
        points.append({"method": row["method"], "sparsity": row.get("sparsity"), "params": params, "label": str(label)})
    if not points:
        raise UserError(f"the config has no rows for a {family}; add rows with family = \"{family}\"")
    return points


def sweep_from_toml(cls, path: str | Path, overrides: dict):
    """`cls` (SweepConfig) from a TOML file whose top-level keys are its fields; with [[row]] tables the
    file is its own grid. Keys, types and ranges are checked by the class, before any model loads."""
    raw = read_toml(path)
    names = [f.name for f in fields(cls) if f.name != "grid"]
    known_keys(raw, names + list(GRID_KEYS), f"config '{path}'")
    settings = {k: v for k, v in raw.items() if k not in GRID_KEYS}
    if "row" in raw:
        if settings.get("config") is not None:
            raise UserError(f"config '{path}': give rows or a config file, not both")
        grid = check_grid({k: raw[k] for k in GRID_KEYS if k in raw}, str(path))
        settings.update(config=str(path), grid=grid)
    elif "focus_depth" in raw:
        raise UserError(f"config '{path}': focus_depth goes with [[row]] tables")
    settings.update(overrides)
    if "model" not in settings:
        raise UserError(f"config '{path}' names no model (model = \"...\")")
    return cls(**settings)
