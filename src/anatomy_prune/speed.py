"""Inference speed of dense, masked and physically pruned models, and the FLOP bound they are held to.

Latency depends only on shapes, so a benchmark needs no data: fixed token ids of the exact length (no
padding), a warm-up, repeats timed back to back, and the median with its spread. Variants that are compared
are timed *interleaved* (one call of each per round, the order rotated every round), so on a shared, noisy
machine a slow spell hits them all alike; each pruned variant's speedup is also given round by round
(dense time / pruned time in the same round), whose median and quartiles are robust to load drift.

The bound: removing FFN neurons removes their FLOPs and nothing else, so a pruned model can at best be
`flops_per_token(dense) / flops_per_token(pruned)` times faster (attention's seq-dependent term included).
What is not counted as FLOPs (layer norms, softmax, residual adds, embedding lookups) does not shrink;
GELU and the FFN biases do shrink with the width, though they are not counted either.

`latency_sweep` is the whole benchmark (benchmarks/latency.py is a thin layer over it); `markdown_table`
turns its result into the README's table.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .apply import mask, physical
from .errors import UserError
from .evaluate import count_params, ffn_flops_per_token, flops_per_token
from .families import base_model, ffn_sites, ffn_widths, get_module
from .models import Loaded
from .plan import PruningPlan, check_sparsity, plan_from_scores, round_up

log = logging.getLogger(__name__)

VARIANTS = ("dense", "mask", "physical")


# --- timing -------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Wall-clock seconds of repeated calls (after warm-up)."""

    times_s: list[float] = field(default_factory=list)

    def _q(self, q: float) -> float:
        return float(np.percentile(self.times_s, q)) if self.times_s else float("nan")

    @property
    def median(self) -> float:
        return self._q(50)

    @property
    def q1(self) -> float:
        return self._q(25)

    @property
    def q3(self) -> float:
        return self._q(75)

    @property
    def min(self) -> float:
        return min(self.times_s) if self.times_s else float("nan")

    @property
    def max(self) -> float:
        return max(self.times_s) if self.times_s else float("nan")

    def to_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "min_s": self.min,
                "max_s": self.max, "repeats": len(self.times_s), "times_s": list(self.times_s)}


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so the clock measures it (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                     device: torch.device | str = "cpu") -> dict[str, Timing]:
    """Time several callables round by round: each is called once per round, the order rotated every round.

    Every callable is first called `warmup` times (lazy initialisation, allocator and cache warm-up).
    The garbage collector is off while timing.
    """
    if repeats < 1 or warmup < 0:
        raise UserError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    out = {name: Timing() for name in names}
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                sync(device)
                start = time.perf_counter()
                fns[name]()
                sync(device)
                out[name].times_s.append(time.perf_counter() - start)
    finally:
        if gc_was_on:
            gc.enable()
    return out


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
              device: torch.device | str = "cpu") -> Timing:
    """Time one callable: `warmup` untimed calls, then `repeats` timed ones."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device)["fn"]


def paired_speedup(base: Timing, other: Timing) -> dict:
    """How much faster `other` is than `base`: the ratio of medians, and the round-by-round ratios'
    median and quartiles (both timings must come from the same interleaved run)."""
    ratios = np.asarray(base.times_s) / np.asarray(other.times_s)
    return {"speedup": base.median / other.median, "paired_median": float(np.median(ratios)),
            "paired_q1": float(np.percentile(ratios, 25)), "paired_q3": float(np.percentile(ratios, 75)),
            "paired_min": float(ratios.min()), "paired_max": float(ratios.max())}


# --- inputs and forward calls -------------------------------------------------------------------

def fixed_inputs(vocab_size: int, batch_size: int, seq_len: int, device: torch.device | str = "cpu",
                 seed: int = 0) -> dict[str, Tensor]:
    """Seeded token ids of exactly seq_len (no padding) and an all-ones attention mask: [batch, seq_len] each."""
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch size and length must be >= 1, got {batch_size} and {seq_len}")
    low = min(1000, vocab_size // 2)  # skip the special tokens at the start of most vocabularies
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (batch_size, seq_len), generator=g)  # [batch, seq_len]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def forward_fn(model: nn.Module, inputs: Mapping[str, Tensor]) -> Callable[[], object]:
    """A no-argument callable running one inference-mode forward pass of `model` on `inputs`."""
    def run() -> object:
        with torch.inference_mode():
            return model(**inputs)
    return run


# --- the FLOP bound and kept widths -------------------------------------------------------------

def ideal_speedup(dense_flops: float, pruned_flops: float) -> float:
    """The FLOP bound: how many times faster the pruned model can be, at best."""
    if pruned_flops <= 0:
        raise ValueError(f"pruned FLOPs must be positive, got {pruned_flops}")
    return float(dense_flops) / float(pruned_flops)


def model_ideal_speedup(dense: nn.Module, pruned: nn.Module, seq_len: int) -> float:
    """ideal_speedup from the two models' FLOPs per token at seq_len (attention's seq term included)."""
    return ideal_speedup(flops_per_token(dense, seq_len), flops_per_token(pruned, seq_len))


def round_widths(widths: Sequence[int], multiple: int, limits: Sequence[int]) -> list[int]:
    """Each kept width rounded up to a multiple of `multiple`, capped at the layer's full width.
    (plan_from_scores(multiple_of=K) does the same while choosing the neurons.)"""
    return [round_up(int(w), int(multiple), int(lim)) for w, lim in zip(widths, limits)]


def noncontiguous_params(model: nn.Module) -> list[str]:
    """Names of parameters that are not contiguous in memory (slow GEMM operands); empty is good."""
    return [n for n, p in model.named_parameters() if not p.is_contiguous()]


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


def embedding_params(model: nn.Module) -> int:
    """Parameters of the embedding tables (token, position, type); FFN pruning never touches them."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())


# --- machine ------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    """What the timings depend on: torch and its threads and BLAS, CPU model and count, GPU if any."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


# --- the sweep ----------------------------------------------------------------------------------

def _variant_name(kind: str, multiple: int) -> str:
    return kind if multiple <= 1 else f"{kind}-x{multiple}"


def build_variants(model: nn.Module, scores: Sequence[Tensor], sparsity: float, multiples: Sequence[int] = (1,),
                   strided: bool = False) -> tuple[dict[str, nn.Module], dict[str, PruningPlan]]:
    """Copies of `model`: masked (apply.mask, zeroed weights) and physically pruned, from the same plan;
    one more physical copy per rounding multiple K > 1 (plan_from_scores(multiple_of=K)); with `strided`,
    a physical copy whose FFN weights are stored non-contiguously. The dense model is included as is."""
    plans = {1: plan_from_scores(scores, sparsity, method="magnitude")}
    for k in multiples:
        if k > 1:
            plans[k] = plan_from_scores(scores, sparsity, multiple_of=k, method="magnitude")
    variants: dict[str, nn.Module] = {"dense": model,
                                      "mask": mask(copy.deepcopy(model), plans[1]).eval()}
    used: dict[str, PruningPlan] = {"mask": plans[1]}
    for k in sorted(set([1, *multiples])):
        name = _variant_name("physical", k)
        variants[name] = physical(copy.deepcopy(model), plans[k]).eval()
        used[name] = plans[k]
    if strided:
        variants["physical-strided"] = make_strided(physical(copy.deepcopy(model), plans[1])).eval()
        used["physical-strided"] = plans[1]
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


@torch.no_grad()
def latency_sweep(loaded: Loaded, sparsities: Sequence[float], batch_sizes: Sequence[int],
                  lengths: Sequence[int], *, repeats: int = 5, warmup: int = 1, multiples: Sequence[int] = (1,),
                  strided: bool = False, seed: int = 0, progress: bool = True,
                  on_sparsity: Callable[[dict], None] | None = None) -> dict:
    """Time dense vs masked vs physically pruned copies of `loaded.model` on its device at each FFN
    sparsity (magnitude plan, same fraction per layer), batch size and length; one row per variant.

    Each row: timing stats, speedup over the dense model timed in the same interleaved rounds (ratio of
    medians and paired quartiles), the FLOP bound (ideal speedup) and measured / ideal, parameters, widths.
    `on_sparsity(partial_result)` is called after each sparsity (to save progress of a long run).
    """
    from .methods import magnitude_scores

    sparsities = [check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise UserError("give at least one sparsity")
    multiples = sorted(set(int(k) for k in multiples) | {1})
    if multiples[0] < 1:
        raise UserError(f"rounding multiples must be >= 1, got {multiples}")
    _check_shapes(loaded, lengths, batch_sizes)
    dense = loaded.model.eval()
    device = loaded.device
    vocab = int(base_model(dense).get_input_embeddings().num_embeddings)
    scores = magnitude_scores(loaded)
    full = ffn_widths(dense)
    emb = embedding_params(dense)
    dense_params = count_params(dense)
    shapes = [(b, n) for n in lengths for b in batch_sizes]
    rows: list[dict] = []
    result = {"device": device.type, "dense": {"params": dense_params, "embedding_params": emb, "ffn_widths": full,
                                               "ffn_flops_per_token": ffn_flops_per_token(dense),
                                               "flops_per_token": {str(n): flops_per_token(dense, n) for n in lengths}},
              "rows": rows}
    bar = tqdm(total=len(sparsities) * len(shapes), desc=f"latency {device.type}", disable=not progress)
    for s in sparsities:
        variants, plans = build_variants(dense, scores, s, multiples, strided)
        bad = {name: noncontiguous_params(m) for name, m in variants.items() if name != "physical-strided"}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            log.warning("non-contiguous parameters after pruning: %s", bad)
        for b, n in shapes:
            inputs = fixed_inputs(vocab, b, n, device, seed)
            timings = time_interleaved({k: forward_fn(m, inputs) for k, m in variants.items()},
                                       warmup=warmup, repeats=repeats, device=device)
            for name, m in variants.items():
                plan = plans.get(name)
                # a masked model does dense FLOPs; it is held to the bound of its plan's physical model
                twin = variants["physical"] if name == "mask" else m
                kept = plan.kept_widths if plan is not None else full
                row = {"device": device.type, "sparsity": s, "batch_size": b, "seq_len": n, "variant": name,
                       "multiple_of": plan.params.get("multiple_of", 1) if plan is not None else 1,
                       "actual_sparsity": 1 - sum(kept) / sum(full), "ffn_widths": kept,
                       "params": count_params(m), "flops_per_token": flops_per_token(m, n),
                       "plan_flops_per_token": flops_per_token(twin, n),
                       "ideal_speedup": model_ideal_speedup(dense, twin, n),
                       "param_reduction": 1 - count_params(twin) / dense_params,
                       **timings[name].to_dict(), **paired_speedup(timings["dense"], timings[name])}
                row["nonembedding_param_reduction"] = row["param_reduction"] * dense_params / max(1, dense_params - emb)
                row["efficiency"] = row["speedup"] / row["ideal_speedup"]  # measured / ideal
                rows.append(row)
            ph = next(r for r in rows[::-1] if r["variant"] == "physical")
            bar.set_postfix_str(f"s={s} b={b} n={n} physical {ph['speedup']:.2f}x of ideal {ph['ideal_speedup']:.2f}x")
            bar.update(1)
        del variants
        gc.collect()
        if on_sparsity is not None:
            on_sparsity(result)
    bar.close()
    return result


OP_GROUPS = {  # aten op -> what it is, for the profile summary
    "aten::addmm": "GEMM", "aten::mm": "GEMM", "aten::bmm": "GEMM", "aten::baddbmm": "GEMM",
    "aten::matmul": "GEMM", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (sdpa)",
    "aten::_scaled_dot_product_efficient_attention": "attention (sdpa)",
    "aten::_scaled_dot_product_flash_attention": "attention (sdpa)", "aten::_softmax": "softmax",
    "aten::native_layer_norm": "layer norm", "aten::gelu": "activation", "aten::silu": "activation",
    "aten::mul": "elementwise", "aten::add": "elementwise", "aten::add_": "elementwise",
    "aten::copy_": "copies (bias broadcast, layout)", "aten::index_select": "embedding",
    "aten::embedding": "embedding",
}


def op_profile(fn: Callable[[], object], *, calls: int = 2, warmup: int = 1) -> dict[str, float]:
    """Self CPU time per call of `fn` (ms), by op group (OP_GROUPS; the rest is "other"), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    groups: dict[str, float] = {}
    for ev in prof.key_averages():
        g = OP_GROUPS.get(ev.key, "other")
        groups[g] = groups.get(g, 0.0) + ev.self_cpu_time_total / 1e3 / calls
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


@torch.no_grad()
def profile_variants(loaded: Loaded, sparsity: float, batch_size: int, seq_len: int, *, calls: int = 2,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Where the time goes in the dense, masked and physically pruned model at one shape (ms per forward)."""
    from .methods import magnitude_scores

    _check_shapes(loaded, [seq_len], [batch_size])
    variants, _ = build_variants(loaded.model.eval(), magnitude_scores(loaded), check_sparsity(sparsity))
    vocab = int(base_model(loaded.model).get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, batch_size, seq_len, loaded.device, seed)
    return {name: op_profile(forward_fn(m, inputs), calls=calls) for name, m in variants.items()}


# --- the README table ---------------------------------------------------------------------------

def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def markdown_table(result: dict, device: str = "cpu") -> str:
    """Speedup and parameter reduction at each sparsity (one table for `device`), as markdown.

    Columns: kept FFN width, parameters and their reduction, then per measured (batch, length) the physical
    model's speedup with its share of the FLOP bound, and the masked model's speedup at the reference shape.
    """
    rows = [r for r in result["rows"] if r["device"] == device]
    if not rows:
        raise UserError(f"no {device} rows in the result")
    shapes = sorted({(r["batch_size"], r["seq_len"]) for r in rows}, key=lambda x: (x[1], x[0]))
    ref = (32, 128) if (32, 128) in shapes else shapes[-1]
    sparsities = sorted({r["sparsity"] for r in rows})
    physical_names = sorted({r["variant"] for r in rows if r["variant"].startswith("physical")
                             and r["variant"] != "physical-strided"}, key=lambda v: (len(v), v))

    def get(s, variant, shape):
        for r in rows:
            if r["sparsity"] == s and r["variant"] == variant and (r["batch_size"], r["seq_len"]) == shape:
                return r
        return None

    head = ["FFN sparsity", "kept FFN width", "params (reduction)", "non-embedding params removed"]
    for b, n in shapes:
        head.append(f"physical b{b}/L{n}: speedup (of ideal)")
    head.append(f"masked b{ref[0]}/L{ref[1]}")
    for name in physical_names[1:]:
        head.append(f"{name} b{ref[0]}/L{ref[1]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sparsities:
        p = get(s, "physical", ref)
        widths = sorted(set(p["ffn_widths"]))
        cells = [f"{s:.0%}" if abs(s * 100 - round(s * 100)) < 1e-9 else f"{s:.3g}",
                 "/".join(map(str, widths)),
                 f"{_fmt_params(p['params'])} (-{p['param_reduction']:.1%})",
                 f"{p['nonembedding_param_reduction']:.1%}"]
        for shape in shapes:
            r = get(s, "physical", shape)
            cells.append(f"{r['speedup']:.2f}x ({r['efficiency']:.0%} of {r['ideal_speedup']:.2f}x)" if r else "")
        m = get(s, "mask", ref)
        cells.append(f"{m['speedup']:.2f}x" if m else "")
        for name in physical_names[1:]:
            r = get(s, name, ref)
            cells.append(f"{r['speedup']:.2f}x ({r['efficiency']:.0%} of {r['ideal_speedup']:.2f}x), "
                         f"width {'/'.join(map(str, sorted(set(r['ffn_widths']))))}" if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
