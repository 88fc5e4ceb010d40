"""How far one speedup measurement can be trusted on this machine (issue 25, item 3): a model is pruned to each
speedup target once, with the plan's measured check off (so nothing here depends on the check), and then the same
pruned model is timed against the dense one again and again, in blocks of --measurements measurements at each
number of interleaved repeats (the plan's check uses pipeline.target.CHECK_REPEATS, the benchmarks 5).

    PYTHONPATH=src .venv/bin/python benchmarks/timing_noise.py --model runs/demo/finetune --out runs/timing-noise

For each target and number of repeats: the measurements' mean, standard deviation and range, per block; the
blocks, run one after another, show the slower drift of the machine's load too. Writes noise.json and table.md
into --out (a run folder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate.timing import measure_speedup  # noqa: E402
from anatomy_prune.models.loading import load_model  # noqa: E402
from anatomy_prune.pipeline.requests import PruneRequest  # noqa: E402
from anatomy_prune.pipeline.step import copy_loaded, prune_step  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402
from anatomy_prune.scores.calibration import make_calibration  # noqa: E402


def measure(args) -> dict:
    loaded = load_model(args.model, device="cpu")
    calib = make_calibration(loaded, args.calib_size)
    dense = copy_loaded(loaded)
    rows = []
    shape = {"batch_size": args.batch_size, "seq_len": args.length}
    for target in args.flops or args.targets:
        kind = {"flops": target} if args.flops else {"speedup": target, "check": False}
        res = prune_step(calib, PruneRequest(method="calibrated", target={**kind, **shape}))
        for block in range(args.blocks):
            for repeats in args.repeats:
                start = time.perf_counter()
                xs = [measure_speedup(dense, res.loaded, args.batch_size, args.length, repeats)["measured_speedup"]
                      for _ in range(args.measurements)]
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                rows.append({"target": target, "kind": next(iter(kind)), "block": block + 1, "repeats": repeats, "speedups": xs,
                             "mean": statistics.mean(xs), "sd": sd, "seconds": round(time.perf_counter() - start, 1)})
                print(f"target {target:g} ({next(iter(kind))}), block {block + 1}, {repeats} repeats: mean {rows[-1]['mean']:.3f}, "
                      f"sd {100 * sd / rows[-1]['mean']:.1f}%, range {min(xs):.3f}-{max(xs):.3f}", flush=True)
    return {"model": args.model, "shape": [args.batch_size, args.length], "measurements": args.measurements,
            "rows": rows}


def table(result: dict) -> str:
    b, s = result["shape"]
    lines = [f"The same pruned model against the dense one, {result['measurements']} measurements per cell, batch "
             f"{b} x {s} (the plan's check off)", "",
             "| target | block | repeats | mean speedup | sd (% of mean) | range | seconds |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        what = f"{r['target']:g}x" if r.get("kind", "speedup") == "speedup" else f"FLOPs {r['target']:g}"
        lines.append(f"| {what} | {r['block']} | {r['repeats']} | {r['mean']:.3f} | "
                     f"{100 * r['sd'] / r['mean']:.1f} | {min(r['speedups']):.3f}-{max(r['speedups']):.3f} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/finetune")
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.5])
    p.add_argument("--flops", type=float, nargs="*", default=[], help="FLOPs targets instead of speedup targets "
                   "(fractions kept; no latency fit)")
    p.add_argument("--repeats", type=int, nargs="+", default=[3, 5, 9], help="interleaved repeats per measurement")
    p.add_argument("--measurements", type=int, default=6, help="measurements per block and number of repeats")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default="runs/timing-noise")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def job():
        for name, values, hi in (("--repeats", args.repeats, 100), ("--measurements", [args.measurements], 100),
                                 ("--blocks", [args.blocks], 20)):
            if not all(1 <= v <= hi for v in values):
                raise UserError(f"{name} must be whole numbers in [1, {hi}], got {values}")
        if not all(1.0 < t <= 100.0 for t in args.targets):
            raise UserError(f"--targets must be speedups above 1 (at most 100), got {args.targets}")
        if not all(0.0 < f < 1.0 for f in args.flops):
            raise UserError(f"--flops must be fractions in (0, 1), got {args.flops}")
        with RunFolder(args.out, "timing-noise", {**vars(args), "out": None}, force=args.force) as rf:
            result = measure(args)
            rf.write_json("noise.json", result)
            rf.write_text("table.md", table(result))
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
