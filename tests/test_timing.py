"""Timing that holds on a noisy machine (evaluate.timing) and the FLOP bound (evaluate.counts)."""
import copy

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.apply import physical
from anatomy_prune.evaluate.counts import flops_per_token, ideal_speedup, model_ideal_speedup
from anatomy_prune.evaluate.timing import (Timing, fixed_inputs, forward_fn, load_average, machine_info,
                                           paired_speedup, peak_mem_mb, time_interleaved)
from anatomy_prune.models.families import ffn_widths
from anatomy_prune.models.loading import TINY
from anatomy_prune.plan import plan_from_scores, round_up

from conftest import assert_tiny


def half_plan(model, sparsity=0.5):
    return plan_from_scores([torch.arange(w, dtype=torch.float) for w in ffn_widths(model)], sparsity)


@pytest.fixture
def tiny_bert():
    loaded = load_model("tiny-bert", device="cpu")
    assert_tiny(loaded)
    return loaded


def test_timing_a_forward_pass_gives_sane_stats(tiny_bert):
    inputs = fixed_inputs(tiny_bert.tokenizer.vocab_size, 2, 16)
    t = time_interleaved({"dense": forward_fn(tiny_bert.model, inputs)}, warmup=1, repeats=5)["dense"]
    d = t.to_dict()
    assert d["repeats"] == 5 and len(d["times_s"]) == 5
    assert 0 < d["min_s"] <= d["q1_s"] <= d["median_s"] <= d["q3_s"] <= d["max_s"] < 10


def test_time_interleaved_warms_up_and_rotates_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = time_interleaved(fns, warmup=2, repeats=3)
    assert calls[:6] == list("aabbcc")  # warm-up: each twice, untimed
    assert calls[6:] == list("abc") + list("bca") + list("cab")  # one call each per round, order rotated
    assert all(len(t.times_s) == 3 for t in out.values())
    with pytest.raises(UserError):
        time_interleaved(fns, repeats=0)


def test_paired_speedup_uses_rounds():
    dense, pruned = Timing([2.0, 4.0, 2.0]), Timing([1.0, 1.0, 2.0])
    s = paired_speedup(dense, pruned)
    assert s["speedup"] == pytest.approx(2.0)  # median 2.0 / median 1.0
    assert s["paired_median"] == pytest.approx(2.0)  # ratios 2, 4, 1
    assert s["paired_min"] == pytest.approx(1.0) and s["paired_max"] == pytest.approx(4.0)


def test_ideal_speedup_arithmetic_on_constructed_case(tiny_bert):
    d, f, layers, seq = TINY["hidden"], TINY["d_ff"], TINY["layers"], 16
    pruned = physical(copy.deepcopy(tiny_bert.model), half_plan(tiny_bert.model))
    kept = f - round(0.5 * f)  # 19 of 37
    assert ffn_widths(pruned) == [kept] * layers
    # per layer: Q, K, V, O (d x d), up and down (d x d_ff), 2 FLOPs per multiply-add, + attention 4 * seq * d
    dense_flops = layers * (2 * (4 * d * d + 2 * d * f) + 4 * seq * d)
    pruned_flops = layers * (2 * (4 * d * d + 2 * d * kept) + 4 * seq * d)
    assert flops_per_token(tiny_bert.model, seq) == dense_flops
    assert model_ideal_speedup(tiny_bert.model, pruned, seq) == pytest.approx(dense_flops / pruned_flops)
    assert ideal_speedup(10, 4) == 2.5
    with pytest.raises(ValueError):
        ideal_speedup(10, 0)


def test_round_up_rounds_up_and_caps():
    """What the latency benchmark's round_widths did, now the allocator's rounding (plan.round_up)."""
    widths = [1536] * 5
    assert [round_up(n, 8, w) for n, w in zip([1382, 768, 5, 1530, 0], widths)] == [1384, 768, 8, 1536, 0]
    assert [round_up(n, 64, 1536) for n in (1382, 1530)] == [1408, 1536]
    assert [round_up(n, 1, 37) for n in (37, 19)] == [37, 19]


def test_fixed_inputs_exact_length_seeded():
    a = fixed_inputs(30522, 3, 17, seed=1)
    b = fixed_inputs(30522, 3, 17, seed=1)
    assert a["input_ids"].shape == (3, 17) and torch.equal(a["input_ids"], b["input_ids"])
    assert bool(a["attention_mask"].all())  # no padding
    assert int(a["input_ids"].min()) >= 1000
    assert not torch.equal(a["input_ids"], fixed_inputs(30522, 3, 17, seed=2)["input_ids"])


def test_machine_info_and_memory():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["threads"] >= 1 and info["cuda"] == torch.cuda.is_available()
    load = load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    assert peak_mem_mb() > 10  # this process has loaded torch
