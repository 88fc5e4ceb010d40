"""Latency benchmark: dense vs masked (zeroed weights, the paper's way) vs physically pruned models, against
the FLOP bound. A thin layer over anatomy_prune.pipeline.latency.

    make bench        # the full run (= --multiple-of 1 8 --out runs/bench): sparsities 0.1..0.9,
                      # batch 1 and 32, length 128 and 512, 5 repeats; 16.5 minutes on 2 quiet cores
                      # (batch 32 x 512 dominates)
    .venv/bin/python benchmarks/latency.py --quick --out runs/bench-quick      # about a minute
    .venv/bin/python benchmarks/latency.py --sparsities 0.5 --batch-sizes 32 --lengths 128 --repeats 7 \\
        --multiple-of 1 8 64 --strided --threads 2 --out runs/bench-rounding

While running, the run folder's resume file (OUT/.anatomy-prune-resume.json) holds what has been measured so
far (rewritten after each sparsity); --from-json redraws from it.
Writes into --out: latency_<UTC date>.json (settings, machine, load before / after, one row per timed
variant), latency.json (the same, latest run), table.md (the README table) and speedup_<device>.png/.pdf.
Latency depends only on shapes, so any model spec works (the default minilm has the shapes of the
fine-tuned runs/demo/model). Timings on a shared machine are noisy: read the recorded load averages.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate.timing import load_average, machine_info  # noqa: E402
from anatomy_prune.models.loading import DEFAULT_ENCODER, load_model  # noqa: E402
from anatomy_prune.pipeline.latency import latency_sweep, profile_variants  # noqa: E402
from anatomy_prune.pipeline.requests import TimingSpec  # noqa: E402
from anatomy_prune.pipeline.report import markdown_table  # noqa: E402
from anatomy_prune.runfolder import RESUME, RunFolder, read_json  # noqa: E402

FULL_SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
QUICK = dict(sparsities=[0.5], batch_sizes=[32], lengths=[128], repeats=3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=DEFAULT_ENCODER, help=f"model spec (default: {DEFAULT_ENCODER})")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--force", action="store_true", help="write into an --out folder of another run")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="FFN sparsities (default: 0.1 0.2 ... 0.9)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="batch sizes (default: 1 32)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default: 128 512)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (default: 1)")
    p.add_argument("--multiple-of", type=int, nargs="+", default=[1],
                   help="also time physical models whose kept widths are rounded up to these multiples, "
                   "e.g. 1 8 64 (default: 1, no rounding)")
    p.add_argument("--strided", action="store_true",
                   help="also time a physical model with non-contiguous FFN weights (what contiguity is worth)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="cpu and/or cuda (default: cpu, plus cuda when present; cuda is skipped when absent)")
    p.add_argument("--profile", action="store_true",
                   help="also profile where CPU time goes (op groups) at each sparsity, first batch size and length")
    p.add_argument("--quick", action="store_true", help="sparsity 0.5, batch 32, length 128, 3 repeats "
                   "(about a minute); explicit options override it")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (default: 0)")
    p.add_argument("--no-figure", action="store_true", help="write JSON and table only")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="time nothing: redraw table.md and the figure into --out from a saved latency JSON "
                   "(the resume file of a run that was cut short included)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    base = dict(sparsities=FULL_SPARSITIES, batch_sizes=[1, 32], lengths=[128, 512], repeats=5)
    if args.quick:
        base.update(QUICK)
    for name in base:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    unknown = [d for d in devices if d.split(":")[0] not in ("cpu", "cuda")]
    if unknown:
        raise UserError(f"unknown device(s) {unknown}; choose cpu and/or cuda")
    return dict(model=args.model, **base, warmup=args.warmup, multiples=sorted(set(args.multiple_of) | {1}),
                strided=args.strided, devices=devices, seed=args.seed, method="magnitude", allocation="local")


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Run the benchmark as configured and write its outputs; returns the JSON written."""
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    out = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["benchmarks/latency.py", *argv]), "settings": settings,
           "machine": machine_info(), "load_before": load_average(), "results": [], "skipped": []}
    start = time.perf_counter()
    with RunFolder(args.out, "latency-benchmark", settings, force=args.force) as rf:
        for dev in settings["devices"]:
            if dev.startswith("cuda") and not torch.cuda.is_available():
                out["skipped"].append(f"{dev}: no CUDA device")
                logging.getLogger("latency").warning("skipping %s: no CUDA device", dev)
                continue
            loaded = load_model(settings["model"], device=dev)

            def save_partial(res: dict) -> None:  # a long run that is killed still leaves what it measured
                rf.write_resume({**out, "results": out["results"] + [res], "load_now": load_average()})

            res = latency_sweep(loaded, settings["sparsities"], settings["batch_sizes"], settings["lengths"],
                                repeats=settings["repeats"],
                                timing=TimingSpec(warmup=settings["warmup"], multiples=settings["multiples"],
                                                  strided=settings["strided"], seed=settings["seed"]),
                                progress=not args.no_progress, on_sparsity=save_partial)
            if args.profile and dev == "cpu":
                b, n = settings["batch_sizes"][0], settings["lengths"][0]
                res["profile"] = {"batch_size": b, "seq_len": n, "ms_per_forward": {
                    str(s): profile_variants(loaded, s, b, n, seed=settings["seed"]) for s in settings["sparsities"]}}
            out["results"].append(res)
            del loaded
        if not out["results"]:
            raise UserError("nothing was timed: no requested device is present; use --devices cpu")
        out["load_after"] = load_average()
        out["total_s"] = round(time.perf_counter() - start, 1)
        write_outputs(out, rf, figure=not args.no_figure)
    return out


def write_outputs(out: dict, rf: RunFolder, figure: bool = True, json_too: bool = True) -> None:
    """latency_<date>.json, latency.json, table.md and the figure(s), staged in the run folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if json_too:
        rf.write_json(f"latency_{stamp}.json", out)
        rf.write_json("latency.json", out)
    rf.write_text("table.md", table_text(out))
    if figure:
        from anatomy_prune.plotting.latency import plot_speedup
        folder = rf.stage_dir("figures")
        for res in out["results"]:
            plot_speedup(out, folder, device=res["device"])


def table_text(out: dict) -> str:
    """The README table(s), with the machine and the command that measured them."""
    m = out["machine"]
    parts = []
    for res in out["results"]:
        where = m.get("cuda_device") if res["device"] == "cuda" else f"{m['cpu']}, {m['threads']} threads"
        parts.append(f"Measured on {where} (torch {m['torch']}), {out['settings']['model']}, "
                     f"load average before / after: {out['load_before']} / {out.get('load_after')}; "
                     f"`{out['command']}` ({out['created']}). Speedup = dense median time / pruned median time, "
                     "ideal = dense FLOPs per token / pruned FLOPs per token.\n\n" + markdown_table(res, res["device"]))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def job():
        if args.from_json:
            out = read_json(args.from_json)
            if isinstance(out, dict) and Path(args.from_json).name == RESUME:
                out = out.get("data") or {}
            if not isinstance(out, dict) or not out.get("results"):
                raise UserError(f"'{args.from_json}' holds no results; give a latency JSON written by this script")
            with RunFolder(args.out, "latency-redraw", {"from": str(args.from_json)}, force=args.force) as rf:
                write_outputs(out, rf, figure=not args.no_figure, json_too=False)
            print(table_text(out))
            return 0
        out = run(args, argv)
        print(table_text(out))
        print(f"wrote {Path(args.out) / 'latency.json'} ({out['total_s']} s)")

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
