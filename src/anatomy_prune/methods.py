"""Pruning methods behind one registry (the CLI's choices come from it).

A method turns a model and its calibration data into a PruningPlan for a target sparsity (the fraction of
all FFN neurons removed): `plan = METHODS[name].fn(calib, sparsity, **params)`. Methods that only rank
neurons are a scorer (one score per neuron and layer, higher = keep) plus `plan_from_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .data import batches, to_device
from .errors import UserError
from .families import base_model, ffn_sites, ffn_widths, get_module, weight_out_in
from .models import Loaded
from .plan import PruningPlan, check_sparsity, plan_from_scores


@dataclass
class Calibration:
    """A model and the texts its data-driven methods look at (a pinned sample of training reviews)."""

    loaded: Loaded
    texts: list[str]
    labels: list[int] | None = None
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0

    def batches(self, with_labels: bool = False) -> Iterator[dict]:
        labels = self.labels if with_labels else None
        for b in batches(self.loaded.tokenizer, self.texts, self.batch_size, self.max_length, labels):
            yield to_device(b, self.loaded.device)


PlanFn = Callable[..., PruningPlan]  # (calib: Calibration, sparsity: float, **params) -> PruningPlan


@dataclass(frozen=True)
class Method:
    name: str
    fn: PlanFn
    help: str
    needs_data: bool = True
    params: dict = field(default_factory=dict)  # parameter name -> default


METHODS: dict[str, Method] = {}


def register(name: str, help: str, needs_data: bool = True, **params) -> Callable[[PlanFn], PlanFn]:
    def add(fn: PlanFn) -> PlanFn:
        METHODS[name] = Method(name, fn, help, needs_data, params)
        return fn
    return add


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_plan(name: str, calib: Calibration, sparsity: float, **params) -> PruningPlan:
    """Run a registered method; the plan records the base model, method, parameters and seed."""
    check_sparsity(sparsity)
    method = get_method(name)
    unknown = set(params) - set(method.params)
    if unknown:
        raise UserError(f"method '{name}' has no parameter(s) {sorted(unknown)}; it takes {sorted(method.params)}")
    plan = method.fn(calib, sparsity, **{**method.params, **params})
    plan.check_fits(calib.loaded.model)
    plan.base_model = plan.base_model or calib.loaded.base_spec
    plan.method = name
    plan.seed = calib.seed if plan.seed is None else plan.seed
    return plan


# --- the two data-free methods ------------------------------------------------------------------

@register("random", "random neurons (the paper's baseline), same fraction in every layer", needs_data=False)
def random_method(calib: Calibration, sparsity: float) -> PruningPlan:
    g = torch.Generator().manual_seed(calib.seed)
    scores = [torch.rand(w, generator=g) for w in ffn_widths(calib.loaded.model)]
    return plan_from_scores(scores, sparsity, seed=calib.seed)


def magnitude_scores(loaded: Loaded) -> list[Tensor]:
    """Per neuron: L2 norm of its input weights (all up / gate rows) times the norm of its output column."""
    base = base_model(loaded.model)
    scores = []
    for site in ffn_sites(loaded.model):
        w_in = torch.cat([weight_out_in(get_module(base, p)).detach() for p in site.up], dim=1)  # [d_ff, k*d]
        w_out = weight_out_in(get_module(base, site.down)).detach()  # [d_model, d_ff]
        scores.append((w_in.float().norm(dim=1) * w_out.float().norm(dim=0)).cpu())
    return scores


@register("magnitude", "weight norm of each neuron (input rows x output column), same fraction per layer",
          needs_data=False)
def magnitude_method(calib: Calibration, sparsity: float) -> PruningPlan:
    return plan_from_scores(magnitude_scores(calib.loaded), sparsity)
