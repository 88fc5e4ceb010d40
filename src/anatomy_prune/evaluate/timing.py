"""Timing: wall-clock seconds of forward passes, measured so that comparisons on a shared, noisy machine hold.

Latency depends only on shapes, so a benchmark needs no data: fixed token ids of the exact length (no
padding), a warm-up, repeats timed back to back, and the median with its spread. Variants that are compared
are timed *interleaved* (one call of each per round, the order rotated every round), so a slow spell hits
them all alike; a speedup is also given round by round (base time / other time in the same round), whose
median and quartiles are robust to load drift. Also: what the timings depend on (machine_info) and where
the time goes (op_profile).
"""
from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.families import base_model


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


def noncontiguous_params(model: nn.Module) -> list[str]:
    """Names of parameters that are not contiguous in memory (slow GEMM operands); empty is good."""
    return [n for n, p in model.named_parameters() if not p.is_contiguous()]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
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


def int8_isa() -> list[str]:
    """The CPU's instructions that decide int8 speed (VNNI, AMX make int8 GEMMs several times faster than
    AVX2 alone): an int8 speedup measured on one CPU does not carry over to another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    keep = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
    return [x for x in keep if x in flags]


def machine_info() -> dict:
    """What the timings depend on: torch and its threads and BLAS, CPU model and count, GPU if any."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "int8_isa": int8_isa()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


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


def runtime_info(device: torch.device) -> dict:
    """The device a run timed on, its name, torch's threads and version (recorded beside timings)."""
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def peak_mem_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def measure_speedup(dense, pruned, batch_size: int = 32, seq_len: int = 128, repeats: int = 5) -> dict:
    """Dense and pruned models timed interleaved on fixed inputs of the target's shape: the measured speedup
    (ratio of medians) with the round-by-round ratios' quartiles."""
    vocab = int(base_model(dense.model).get_input_embeddings().num_embeddings)
    seq_len = min(seq_len, dense.max_positions)
    inputs = fixed_inputs(vocab, batch_size, seq_len, dense.device)
    t = time_interleaved({"dense": forward_fn(dense.model, inputs), "pruned": forward_fn(pruned.model, inputs)},
                         warmup=1, repeats=repeats, device=dense.device)
    sp = paired_speedup(t["dense"], t["pruned"])
    return {"measured_speedup": sp["speedup"], "speedup_paired_q1": sp["paired_q1"], "speedup_paired_q3": sp["paired_q3"],
            "speedup_shape": [batch_size, seq_len], "dense_forward_s": t["dense"].median, "pruned_forward_s": t["pruned"].median}
