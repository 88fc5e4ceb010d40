"""The latency benchmark: dense vs masked vs physically pruned copies of a model, timed interleaved at each
sparsity and shape and held to the FLOP bound (`make bench` runs it; benchmarks/latency.py is a thin layer
over `latency_sweep`). Plans come from the pruning step with magnitude scores, the same fraction per layer.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..evaluate.counts import count_params, embedding_params, ffn_flops_per_token, flops_per_token, model_ideal_speedup
from ..evaluate.timing import fixed_inputs, forward_fn, noncontiguous_params, op_profile, paired_speedup, time_interleaved
from ..models.families import base_model, ffn_sites, ffn_widths, get_module
from ..models.loading import Loaded
from ..plan.plan import PruningPlan, check_sparsity
from ..progress import tqdm
from ..scores.calibration import Calibration
from .requests import Allocation, PruneRequest, TimingSpec
from .step import prune_step

log = logging.getLogger(__name__)


def _variant_name(kind: str, multiple: int) -> str:
    return kind if multiple <= 1 else f"{kind}-x{multiple}"


def build_variants(loaded: Loaded, calib: Calibration, sparsity: float, multiples: Sequence[int] = (1,),
                   strided: bool = False) -> tuple[dict[str, nn.Module], dict[str, PruningPlan]]:
    """Copies of the model through the pruning step (magnitude scores): masked (zeroed weights) and
    physically pruned from the same plan; one more physical copy per rounding multiple K > 1; with
    `strided`, a physical copy whose FFN weights are stored non-contiguously. The dense model as is."""
    def step(mode: str, k: int = 1):
        req = PruneRequest(method="magnitude", sparsity=sparsity, mode=mode, allocation=Allocation(multiple_of=k))
        return prune_step(calib, req)

    masked_ = step("mask")
    variants: dict[str, nn.Module] = {"dense": loaded.model, "mask": masked_.loaded.model.eval()}
    used: dict[str, PruningPlan] = {"mask": masked_.plan}
    for k in sorted(set([1, *multiples])):
        name = _variant_name("physical", k)
        res = step("physical", k)
        variants[name], used[name] = res.loaded.model.eval(), res.plan
    if strided:
        res = step("physical")
        variants["physical-strided"] = make_strided(res.loaded.model).eval()
        used["physical-strided"] = res.plan
    return variants, used


def _check_shapes(loaded: Loaded, lengths: Sequence[int], batch_sizes: Sequence[int]) -> None:
    if not lengths or not batch_sizes:
        raise UserError("give at least one sequence length and one batch size")
    too_long = [n for n in lengths if n > loaded.max_positions]
    if too_long:
        raise UserError(f"length(s) {too_long} exceed the model's {loaded.max_positions} positions; "
                        f"choose lengths up to {loaded.max_positions}")
    if min(lengths) < 1 or min(batch_sizes) < 1:
        raise UserError("lengths and batch sizes must be >= 1")


def _dense_info(dense: nn.Module, lengths: Sequence[int]) -> dict:
    return {"params": count_params(dense), "embedding_params": embedding_params(dense), "ffn_widths": ffn_widths(dense),
            "ffn_flops_per_token": ffn_flops_per_token(dense),
            "flops_per_token": {str(n): flops_per_token(dense, n) for n in lengths}}


def _variant_row(name: str, m: nn.Module, variants: dict[str, nn.Module], plan: PruningPlan | None, dense: dict,
                 at: dict, timings: dict) -> dict:
    """One variant's row at `at` (device, sparsity, batch_size, seq_len): its timing and its bounds."""
    n = at["seq_len"]
    # a masked model does dense FLOPs; it is held to the bound of its plan's physical model
    twin = variants["physical"] if name == "mask" else m
    full, dense_params, emb = dense["ffn_widths"], dense["params"], dense["embedding_params"]
    kept = plan.kept_widths if plan is not None else full
    row = {**at, "variant": name,
           "multiple_of": plan.params.get("multiple_of", 1) if plan is not None else 1,
           "actual_sparsity": 1 - sum(kept) / sum(full), "ffn_widths": kept,
           "params": count_params(m), "flops_per_token": flops_per_token(m, n),
           "plan_flops_per_token": flops_per_token(twin, n),
           "ideal_speedup": model_ideal_speedup(variants["dense"], twin, n),
           "param_reduction": 1 - count_params(twin) / dense_params,
           **timings[name].to_dict(), **paired_speedup(timings["dense"], timings[name])}
    row["nonembedding_param_reduction"] = row["param_reduction"] * dense_params / max(1, dense_params - emb)
    row["efficiency"] = row["speedup"] / row["ideal_speedup"]  # measured / ideal
    return row


def _time_sparsity(loaded: Loaded, variants: dict[str, nn.Module], plans: dict[str, PruningPlan], s: float,
                   shapes: list[tuple[int, int]], dense: dict, repeats: int, timing: TimingSpec, bar) -> list[dict]:
    """The rows of one sparsity: every variant timed interleaved at each shape."""
    vocab = int(base_model(loaded.model).get_input_embeddings().num_embeddings)
    bad = {name: noncontiguous_params(m) for name, m in variants.items() if name != "physical-strided"}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        log.warning("non-contiguous parameters after pruning: %s", bad)
    rows: list[dict] = []
    for b, n in shapes:
        inputs = fixed_inputs(vocab, b, n, loaded.device, timing.seed)
        timings = time_interleaved({k: forward_fn(m, inputs) for k, m in variants.items()},
                                   warmup=timing.warmup, repeats=repeats, device=loaded.device)
        at = {"device": loaded.device.type, "sparsity": s, "batch_size": b, "seq_len": n}
        rows += [_variant_row(name, m, variants, plans.get(name), dense, at, timings)
                 for name, m in variants.items()]
        ph = next(r for r in rows[::-1] if r["variant"] == "physical")
        bar.set_postfix_str(f"s={s} b={b} n={n} physical {ph['speedup']:.2f}x of ideal {ph['ideal_speedup']:.2f}x")
        bar.update(1)
    return rows


@torch.no_grad()
def latency_sweep(loaded: Loaded, sparsities: Sequence[float], batch_sizes: Sequence[int],
                  lengths: Sequence[int], *, repeats: int = 5, timing: TimingSpec | None = None,
                  progress: bool = True, on_sparsity: Callable[[dict], None] | None = None) -> dict:
    """Time dense vs masked vs physically pruned copies of `loaded.model` on its device at each FFN
    sparsity (magnitude plan, same fraction per layer), batch size and length; one row per variant, with
    its speedup over the dense model timed in the same rounds and the FLOP bound. `timing`: warm-up,
    rounding multiples, strided control, seed. `on_sparsity(partial_result)` runs after each sparsity."""
    sparsities = [check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise UserError("give at least one sparsity")
    timing = timing or TimingSpec()
    _check_shapes(loaded, lengths, batch_sizes)
    dense = loaded.model.eval()
    calib = Calibration(loaded, [], seed=timing.seed)
    shapes = [(b, n) for n in lengths for b in batch_sizes]
    rows: list[dict] = []
    result = {"device": loaded.device.type, "dense": _dense_info(dense, lengths), "rows": rows}
    bar = tqdm(total=len(sparsities) * len(shapes), desc=f"latency {loaded.device.type}", disable=not progress)
    for s in sparsities:
        variants, plans = build_variants(loaded, calib, s, timing.multiples, timing.strided)
        rows += _time_sparsity(loaded, variants, plans, s, shapes, result["dense"], repeats, timing, bar)
        del variants
        gc.collect()
        if on_sparsity is not None:
            on_sparsity(result)
    bar.close()
    return result


@torch.no_grad()
def profile_variants(loaded: Loaded, sparsity: float, batch_size: int, seq_len: int, *, calls: int = 2,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Where the time goes in the dense, masked and physically pruned model at one shape (ms per forward)."""
    _check_shapes(loaded, [seq_len], [batch_size])
    variants, _ = build_variants(loaded, Calibration(loaded, [], seed=seed), check_sparsity(sparsity))
    vocab = int(base_model(loaded.model).get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, batch_size, seq_len, loaded.device, seed)
    return {name: op_profile(forward_fn(m, inputs), calls=calls) for name, m in variants.items()}




def make_strided(model: nn.Module) -> nn.Module:
    """Store every FFN Linear weight column-major (same values, non-contiguous): a control that shows
    what contiguous weights after slicing are worth. In place; returns the model."""
    base = base_model(model)
    for site in ffn_sites(model):
        for path in site.up + (site.down,):
            mod = get_module(base, path)
            if isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(mod.weight.detach().t().contiguous().t(), requires_grad=False)
    return model
