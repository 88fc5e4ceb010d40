"""Held-out check: pruning methods on the 5,000 IMDB reviews of the named `heldout` split (data.splits:
deduplicated, disjoint from the fine-tune's, the calibration's and the test reviews), so that small gaps can
be told from noise (standard error near 0.5 points), with paired tests between methods.

    .venv/bin/python benchmarks/heldout.py                                  # 10%, the demo model
    .venv/bin/python benchmarks/heldout.py --sparsities 0.3 0.5 0.7 --methods calibrated,strategy

A thin layer over the sweep (`anatomy-prune sweep --split heldout --eval-size 5000`): --out holds the sweep
folder and report.md with the paired comparisons (McNemar, Holm-corrected).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anatomy_prune.errors import exit_status
from anatomy_prune.pipeline.report import compare_methods, write_report
from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, SweepConfig
from anatomy_prune.pipeline.sweep import run_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="runs/demo/finetune", help="fine-tuned classifier (default: runs/demo/finetune)")
    p.add_argument("--methods", default="calibrated,strategy,activation", help="comma-separated registered methods")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1], help="(default: 0.1)")
    p.add_argument("--n", type=int, default=5000, help="held-out reviews (default: 5000, the whole split)")
    p.add_argument("--calib-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of random methods (default: 5)")
    p.add_argument("--out", default="runs/heldout", help="(default: runs/heldout)")
    p.add_argument("--force", action="store_true", help="write into an --out folder of another run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def job():
        cfg = SweepConfig(model=args.model, methods=methods, sparsities=args.sparsities, mode="physical",
                          eval=EvalSpec(size=args.n, split="heldout"), calib=CalibSpec(size=args.calib_size),
                          seeds=args.seeds)
        run_sweep(cfg, args.out, force=args.force, progress=False)
        report = write_report(args.out, Path(args.out).with_suffix(".md"), title="Held-out comparison")
        print(compare_methods(args.out)["markdown"])
        print(f"wrote {args.out} and {report}")

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
