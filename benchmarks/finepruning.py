"""Fine-pruning benchmark: random, magnitude, movement and GUM at one MLP sparsity on one real model, with
the task metric, the time each took and the redundancy each leaves behind, beside the second paper's findings.

    .venv/bin/python benchmarks/finepruning.py                     # the documented run (defaults below)
    .venv/bin/python benchmarks/finepruning.py --model smollm2 --task lm --batch-size 2 --max-length 64 ...

Default: the fine-tuned minilm IMDB classifier (runs/demo/finetune) fine-pruned to 50% of its FFN neurons on
IMDB classification, 30 steps of 8 reviews x 128 tokens, accuracy on 200 held-out test reviews. Chosen by
measuring one training step first on the shared 2-core CPU: smollm2 LM fine-pruning took ~90 s per step of
4 x 128 tokens (so 100+ steps x 4 methods would take hours), minilm ~10 s per step of 8 x 128 under load.

Writes into --out: finepruning_<UTC date>.json and finepruning.json (settings, load averages, one row per
method), one run folder per method (results.json, plan.json, model/, figures/), dense/ (redundancy of the
starting model) and figures/ (the comparison). Times on a shared machine are noisy: read the load averages.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from anatomy_prune.errors import exit_status  # noqa: E402
from anatomy_prune.anatomy.redundancy import summary  # noqa: E402
from anatomy_prune.finepruning.train import METHODS, FinepruneConfig, finepruning  # noqa: E402
from anatomy_prune.pipeline.redundancy import redundancy_job  # noqa: E402
from anatomy_prune.plotting.redundancy import plot_methods, plot_per_layer  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402

PAPER = ("paper (GPT-2 / GPT-Neo on Wikitext-103, WikiSQL, SAMSum; numbers not retrieved): random pruning "
         "nearly matches the best methods; movement can underperform; GUM beats movement and the other methods")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="runs/demo/finetune", help="model spec (default: runs/demo/finetune)")
    p.add_argument("--task", choices=("lm", "imdb"), default="imdb", help="(default: imdb)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--sparsity", type=float, default=0.5, help="(default: 0.5)")
    p.add_argument("--steps", type=int, default=30, help="(default: 30)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    p.add_argument("--max-length", type=int, default=128, help="(default: 128)")
    p.add_argument("--train-size", type=int, default=2000, help="(default: 2000)")
    p.add_argument("--eval-size", type=int, default=200, help="(default: 200)")
    p.add_argument("--analysis-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", default="runs/finepruning/bench", help="(default: runs/finepruning/bench)")
    p.add_argument("--force", action="store_true", help="write into an --out folder of another run")
    return p


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = FinepruneConfig(model=args.model, task=args.task, sparsity=args.sparsity, steps=args.steps,
                           batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
                           eval_size=args.eval_size, analysis_size=args.analysis_size, seed=args.seed)
    for m in methods:
        FinepruneConfig(**{**asdict(base), "method": m}).validate()
    started, load_before, t0 = datetime.now(timezone.utc), _load(), time.perf_counter()
    with RunFolder(out, "finepruning-benchmark", {**vars(args), "out": None}, force=args.force) as rf:
        dense = redundancy_job(out / "dense", base, progress=False)
        rows, dense_metric = [], None
        for i, m in enumerate(methods):
            cfg = FinepruneConfig(**{**asdict(base), "method": m, "eval_dense": i == 0})
            r = finepruning(cfg, out / m, progress=True).results
            metric = r["metric"]
            dense_metric = r["dense_" + metric] if i == 0 else dense_metric
            rows.append({"label": m, "method": m, "selection": r["selection"], "metric": metric, metric: r[metric],
                         "dense_" + metric: dense_metric, "sparsity": r["sparsity"], "target_sparsity": args.sparsity,
                         "train_s": r["time"]["train_s"], "s_per_step": r["time"]["s_per_step"],
                         "total_s": r["time"]["total_s"], "kept_widths": r["kept_widths"],
                         "redundancy": r["redundancy"], "load_after": _load()})
        report = {"created": started.isoformat(timespec="seconds"), "settings": vars(args), "paper": PAPER,
                  "load_before": load_before, "load_after": _load(), "wall_s": time.perf_counter() - t0,
                  "dense": {"redundancy": summary(dense), "dense_" + rows[0]["metric"]: dense_metric}, "rows": rows,
                  "note": "timings taken on a shared 2-core CPU under load from other agents; see load averages"}
        rf.write_json(f"finepruning_{started.strftime('%Y%m%dT%H%M%S')}.json", report)
        rf.write_json("finepruning.json", report)
        figs = rf.stage_dir("figures")
        plot_methods(rows, figs)
        per_layer = {"dense (start)": {"redundancy": summary(dense), "kept_widths": [x["width"] for x in dense["layers"]]}}
        per_layer.update({r["label"]: r for r in rows})
        plot_per_layer(per_layer, figs, name="redundancy_per_layer_methods")
    return report


def table(report: dict) -> str:
    rows = report["rows"]
    metric = rows[0]["metric"]
    d = report["dense"]
    lines = [f"| method | selection | {metric} | sparsity | train s (s/step) | sens_sum | unique |",
             "|---|---|---|---|---|---|---|",
             f"| dense start | - | {d['dense_' + metric]:.4g} | 0 | - | {d['redundancy']['sens_sum']:.4g} | "
             f"{d['redundancy']['unique']:.4f} |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['selection']} | {r[metric]:.4g} | {r['sparsity']:.3f} | "
                     f"{r['train_s']:.0f} ({r['s_per_step']:.1f}) | {r['redundancy']['sens_sum']:.4g} | "
                     f"{r['redundancy']['unique']:.4f} |")
    return "\n".join(lines) + f"\n\n{report['paper']}\nload average before {report['load_before']}, after " \
        f"{report['load_after']}; wall {report['wall_s']:.0f} s"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)

    def job():
        report = run(args)
        print(table(report))

    return exit_status(job, "finepruning benchmark")


if __name__ == "__main__":
    sys.exit(main())
