"""The output tuning's ridge, chosen on validation reviews: SmolLM2-135M (by default) with a share of its FFN
removed by `calibrated` once, then tuned toward the dense model with each ridge (apply.tune, times the Gram's mean
diagonal), each scored by perplexity on IMDB validation reviews (to choose) and test reviews (to report).

    .venv/bin/python benchmarks/tune_ridge.py --out runs/tune-ridge        # the README's selection (about 40 min)
    .venv/bin/python benchmarks/tune_ridge.py --model tiny-llama --calib-size 8 --texts 8 --out runs/tune-ridge-smoke

Every ratio is a paired bootstrap over texts against dense (95% interval); the last column pairs each ridge with
the first one given. Writes tune_ridge.json and table.md into --out (a run folder).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anatomy_prune.apply.tune import tune_outputs  # noqa: E402
from anatomy_prune.data import lm_texts  # noqa: E402
from anatomy_prune.data.splits import take  # noqa: E402
from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate import perplexity  # noqa: E402
from anatomy_prune.evaluate.metrics import paired_perplexity  # noqa: E402
from anatomy_prune.models import load_model  # noqa: E402
from anatomy_prune.pipeline.requests import PruneRequest  # noqa: E402
from anatomy_prune.pipeline.step import copy_loaded, prune_step  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402
from anatomy_prune.scores import make_calibration  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the sibling scripts, also when loaded by path
from decoder_variants import _test  # noqa: E402  (a paired ratio with its interval and p, to 3 decimals)

SPLITS = ("validation", "test")


def measure(args) -> dict:
    req = PruneRequest(method="calibrated", sparsity=args.ffn)   # checked before anything is loaded
    if not all(0 < r < 1e6 for r in args.ridges):
        raise UserError(f"--ridges must be positive numbers below 1e6, got {args.ridges}")
    loaded = load_model(args.model, device="cpu")
    texts = {"validation": take("imdb", "validation", args.texts).texts, "test": lm_texts("imdb", args.texts)}
    calib = make_calibration(loaded, args.calib_size, args.max_length, seed=0,
                             exclude=texts["validation"] + texts["test"], batch_size=8)
    ppl = lambda model, split: perplexity(model, texts[split], args.max_length, batch_size=8, progress=False)  # noqa: E731
    dense = {s: ppl(loaded, s) for s in SPLITS}
    base = prune_step(calib, req, tune=False)
    got, rows = {}, []
    for ridge in args.ridges:
        work, start = copy_loaded(base.loaded), time.perf_counter()
        tune_outputs(work, loaded, calib, ridge)
        tune_s = time.perf_counter() - start
        got[ridge] = {s: ppl(work, s) for s in SPLITS}
        first = got[args.ridges[0]]
        rows.append({"ridge": ridge, "tune_s": round(tune_s, 1),
                     **{s: {"vs_dense": paired_perplexity(got[ridge][s], dense[s]),
                            "vs_first": paired_perplexity(got[ridge][s], first[s]) if ridge != args.ridges[0] else None}
                        for s in SPLITS}})
        print(f"ridge {ridge:g}: " + "  ".join(f"{s} {_test(rows[-1][s]['vs_dense'])}" for s in SPLITS), flush=True)
        del work
    return {"model": args.model, "ffn": args.ffn, "texts": args.texts, "calib_size": len(calib.texts),
            "dense": {s: dense[s]["perplexity"] for s in SPLITS}, "rows": rows}


def table(result: dict) -> str:
    first = result["rows"][0]["ridge"]
    lines = [f"| ridge | validation x dense | test x dense | validation vs ridge {first:g} | tune s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['ridge']:g} | {_test(r['validation']['vs_dense'])} | {_test(r['test']['vs_dense'])} | "
                     f"{_test(r['validation']['vs_first'])} | {r['tune_s']:.0f} |")
    best = min(result["rows"], key=lambda r: r["validation"]["vs_dense"]["ratio"])
    return "\n".join(lines) + f"\n\nchosen on validation: ridge {best['ridge']:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ffn", type=float, default=0.5, help="share of FFN neurons removed (default: 0.5)")
    p.add_argument("--ridges", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--texts", type=int, default=100, help="validation and test reviews each (default: 100)")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/tune-ridge")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def job():
        with RunFolder(args.out, "tune-ridge-benchmark", {**vars(args), "out": None}) as rf:
            result = measure(args)
            rf.write_json("tune_ridge.json", result)
            rf.write_text("table.md", table(result) + "\n")
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
