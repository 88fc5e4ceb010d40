"""Statistics a reviewer needs to tell a finding from noise.

- `wilson`: the 95% (or any level) interval of an accuracy on n examples (Wilson score interval).
- `mcnemar`: the exact McNemar test of two classifiers on the *same* examples: only the examples on which
  they disagree count; p-value two-sided from the binomial distribution.
- `paired_bootstrap`: an interval of the difference of two paired metrics (accuracy or mean per-example
  loss), resampling the examples.
- `seed_summary`: mean, standard deviation and every value of a metric over seeds.
- `classification_report`: accuracy, F1, ROC-AUC and the confusion matrix (scikit-learn), with the
  accuracy's interval.
A difference is "supported" only when the paired test's p-value is below 1 - level (or the bootstrap
interval excludes 0); otherwise results are reported as indistinguishable.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import UserError

LEVEL = 0.95


def check_level(level: float) -> float:
    try:
        v = float(level)
    except (TypeError, ValueError):
        raise UserError(f"a confidence level must be a number in (0, 1), got {level!r}") from None
    if isinstance(level, bool) or not 0.0 < v < 1.0:
        raise UserError(f"a confidence level must be in (0, 1), got {level}")
    return v


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + check_level(level) / 2))


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes out of n)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: do classifiers A and B differ in accuracy on the same examples?

    Returns the discordant counts (a_only: A right and B wrong, b_only: A wrong and B right), the difference in
    accuracy (A - B) and the two-sided p-value of the binomial test of a_only against a_only + b_only
    with p = 1/2."""
    from scipy.stats import binomtest

    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("McNemar needs two equally long, non-empty vectors of per-example correctness")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"a_only": b, "b_only": c, "diff": float(a.mean() - b_.mean()), "p_value": p, "n": int(a.size)}


def paired_bootstrap(values_a: Sequence[float], values_b: Sequence[float], level: float = LEVEL,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """Interval of mean(A) - mean(B) over the same examples, by resampling examples (percentile bootstrap)."""
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("a paired bootstrap needs two equally long, non-empty vectors")
    level = check_level(level)
    rng = np.random.default_rng(seed)
    d = a - b
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "level": level, "n_boot": n_boot}


def supported(test: dict, level: float = LEVEL) -> bool:
    """Whether a paired comparison shows a difference beyond its noise at `level`."""
    if "p_value" in test:
        return test["p_value"] < 1 - level
    return not (test["low"] <= 0.0 <= test["high"])


def seed_summary(values: Sequence[float]) -> dict:
    v = np.asarray(list(values), dtype=float)
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n_seeds": int(v.size), "values": v.tolist()}


def classification_report(labels: Sequence[int], scores: Sequence[float], level: float = LEVEL) -> dict:
    """Accuracy with its interval, F1, ROC-AUC and the confusion matrix of a binary classifier whose
    `scores` are logits (or probabilities: the threshold is the sign of logit / 0.5 of a probability is the
    same decision only for logits; pass logits)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    pred = (s > 0).astype(int)
    acc = float(accuracy_score(y, pred))
    lo, hi = wilson(int((pred == y).sum()), int(y.size), level)
    out = {"accuracy": acc, "accuracy_interval": [lo, hi], "interval_level": level,
           "f1": float(f1_score(y, pred, zero_division=0.0)),
           "roc_auc": float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else None,
           "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
           "standard_error": math.sqrt(acc * (1 - acc) / max(1, y.size))}
    return out
