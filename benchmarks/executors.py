"""In-process against Ray: the same 20-point sweep (random, magnitude, strategy, activation x 10-90%, physical)
of a tiny BERT classifier on 120 labelled reviews, run with executor="local" and then executor="ray" (a local
Ray instance, one CPU and one torch thread per point), timed as wholes, and checked to give the same
accuracies and the same neurons removed per layer at every point.

    .venv/bin/python benchmarks/executors.py          # needs ray (pip install "anatomy-prune[cluster]")

Prints one JSON line. Measured twice (2 shared cores, another job running): local 14.6 s / 7.1 s, ray 20.8 s /
21.7 s, identical results both times: at this size Ray's start-up (about 15 s) outweighs two-way parallelism;
its use is points that take minutes, on more machines.
"""
from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from anatomy_prune.models.saved import save_model  # noqa: E402
from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, SweepConfig  # noqa: E402
from anatomy_prune.pipeline.sweep import run_sweep  # noqa: E402
from conftest import TEXTS, make_classifier  # noqa: E402


def main() -> int:
    d = Path(tempfile.mkdtemp(prefix="executors-"))
    clf = save_model(make_classifier("tiny-bert"), d / "clf", max_length=32)
    with (d / "reviews.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((f"{TEXTS[i % 4]} (review {i})", i % 2) for i in range(120))
    cfg = SweepConfig(model=str(clf), methods=("random", "magnitude", "strategy", "activation"),
                      sparsities=(0.1, 0.3, 0.5, 0.7, 0.9), seeds=1, mode="physical", figures=False,
                      eval=EvalSpec(data=str(d / "reviews.csv"), size=120),
                      calib=CalibSpec(size=16, data=str(d / "reviews.csv")))
    torch.set_num_threads(2)
    start = time.perf_counter()
    local = run_sweep(cfg, d / "local", progress=False)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    remote = run_sweep(replace(cfg, executor="ray"), d / "ray", progress=False)
    ray_s = time.perf_counter() - start
    same = len(local) == len(remote) and all(
        a["accuracy"] == b["accuracy"] and a.get("neurons_removed_per_layer") == b.get("neurons_removed_per_layer")
        for a, b in zip(local, remote))
    print(json.dumps({"points": len(local) - 1, "local_s": round(local_s, 1), "ray_s": round(ray_s, 1),
                      "ray_over_local": round(ray_s / local_s, 2), "same_results": same, "folder": str(d)}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
