"""The statistics behind every number a report prints: intervals, paired tests, and the sweep comparison table."""
import json

import numpy as np
import pytest

from anatomy_prune.evaluate.stats import mcnemar, paired_bootstrap, seed_summary, supported, wilson
from anatomy_prune.pipeline.report import compare_methods, write_report


def test_wilson_matches_the_textbook_value():
    # 85 of 100 at 95%: Wilson's interval is [0.7672, 0.9069] (z = 1.95996)
    lo, hi = wilson(85, 100)
    assert lo == pytest.approx(0.7672, abs=1e-4) and hi == pytest.approx(0.9069, abs=1e-4)
    lo0, hi0 = wilson(0, 20)
    assert lo0 == 0.0 and 0.1 < hi0 < 0.2  # not the degenerate [0, 0] of the normal approximation
    assert wilson(850, 1000)[1] - wilson(850, 1000)[0] < hi - lo  # more reviews, narrower


def test_mcnemar_counts_only_the_discordant_reviews():
    a = [1] * 40 + [0] * 10 + [1] * 50
    b = [1] * 100
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"]) == (0, 10)
    assert t["p_value"] == pytest.approx(2 * 0.5 ** 10)  # exact binomial, two-sided
    assert t["diff"] == pytest.approx(-0.1)
    same = mcnemar(a, a)
    assert same["p_value"] == 1.0 and not supported(same)
    with pytest.raises(ValueError):
        mcnemar([1, 0], [1])


def test_paired_bootstrap_interval_contains_the_difference_and_excludes_zero_when_clear():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 400)
    b = a - 0.5 + rng.normal(0, 0.1, 400)
    t = paired_bootstrap(a, b)
    assert t["low"] < 0.5 < t["high"] and supported(t)
    t0 = paired_bootstrap(a, a + rng.normal(0, 0.1, 400))
    assert t0["low"] < 0 < t0["high"] and not supported(t0)


def test_seed_summary():
    s = seed_summary([0.8, 0.82, 0.84])
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02) and s["n_seeds"] == 3


def _fake_sweep(d, n=400):
    """A sweep folder by hand: dense, two labelled variants at 50%, a seeded method, and a cost-target row."""
    rng = np.random.default_rng(1)
    dense = (rng.random(n) < 0.85).astype(int)
    good = dense.copy()                              # identical to dense
    bad = dense.copy()
    bad[np.flatnonzero(dense)[:60]] = 0               # 60 more errors: clearly worse
    seed_a, seed_b = bad.copy(), dense.copy()        # one clearly worse seed, one identical seed
    target = dense.copy()
    preds = [dense, good, bad, seed_a, seed_b, target]
    meta = [("dense", 0.0, None, None), ("strategy", 0.5, "paper rule", None), ("strategy", 0.5, "uniform", None),
            ("random", 0.5, None, 0), ("random", 0.5, None, 1), ("calibrated", 0.5, "target flops 0.5", None)]
    rows = [{"method": m, "sparsity": s, "target_sparsity": s, "label": lab, "seed": seed,
             "accuracy": float(p.mean()), "latency_s": 1.0, "params": 1, "flops_per_token": 1, "prune_s": 0.0}
            for (m, s, lab, seed), p in zip(meta, preds)]
    d.mkdir()
    (d / "results.json").write_text(json.dumps(rows))
    (d / "predictions.json").write_text(json.dumps({"rows": [p.tolist() for p in preds]}))
    return rows


def test_compare_methods_puts_labelled_variants_against_each_other(tmp_path):
    _fake_sweep(tmp_path / "s")
    out = compare_methods(tmp_path / "s")
    by = {(e["method"], e["label"]): e for e in out["rows"]}
    # the two ablation variants share one group: one is best, the other is compared with it
    plain = [e for e in out["rows"] if e["label"] is None]
    assert sum(e["best"] for e in plain) == 1
    assert by[("strategy (paper rule)", None)]["best"]
    worse = by[("strategy (uniform)", None)]
    assert worse["vs_best_diff"] == pytest.approx(-60 / 400) and worse["vs_best_supported"]
    # the seeded method is "different" only if every seed is: its identical seed makes it indistinguishable
    rnd = by[("random", None)]
    assert rnd["n_seeds"] == 2 and rnd["vs_dense_p"] == 1.0 and not rnd["vs_dense_supported"]
    # the cost-target row is its own group, so it is the best there and never compared with the variants
    tgt = by[("calibrated", "target flops 0.5")]
    assert tgt["best"] and tgt["vs_best_p"] is None
    # Holm: adjusted p-values are at least the raw ones, and at most 1
    for e in out["rows"]:
        assert e["vs_dense_p"] <= e["vs_dense_p_holm"] <= 1.0
    assert "Holm-corrected over 6 tests" in out["markdown"]


def test_report_compares_seeded_random_with_the_paper_by_its_mean(tmp_path):
    rows = _fake_sweep(tmp_path / "s")
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"reference": {
        "label": "paper", "dense": 0.852, "points": [{"method": "random", "sparsity": 0.5, "accuracy": 0.582}]}}))
    text = write_report(tmp_path / "s", None)
    mean = (rows[3]["accuracy"] + rows[4]["accuracy"]) / 2 - rows[0]["accuracy"]
    assert f"| random | 50% | -27.0 | {100 * mean:+.1f} (mean of 2 seeds) |" in text
