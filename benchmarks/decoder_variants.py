"""Techniques tried on a decoder (issue 25, item 2), each against ours all at once on the same texts, at the same
final FFN sparsity: the same scores with nearly the same width in every layer (a floor of 0.9 x the kept share;
the layer-wise path keeps equal widths), and iterative pruning that recalibrates between steps (`prune --iterations
N`, pipeline.iterative: the model pruned part of the way is scored again on the calibration texts, its Gram
matrices and gradients recomputed, before the next share goes).

    .venv/bin/python benchmarks/decoder_variants.py --calib-size 128 --out runs/decoder-variants   # the README's run
    .venv/bin/python benchmarks/decoder_variants.py --eval-texts 8 --calib-size 8 --steps 2 --out /tmp/dv

Every variant is evaluated on the same held-out IMDB test reviews as benchmarks/decoders.py: perplexity with a
95% bootstrap interval over texts and a paired bootstrap test against ours all at once. Writes variants.json
and table.md into --out (a run folder).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anatomy_prune.data import lm_texts  # noqa: E402
from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate import perplexity  # noqa: E402
from anatomy_prune.evaluate.metrics import paired_perplexity  # noqa: E402
from anatomy_prune.models import load_model  # noqa: E402
from anatomy_prune.pipeline.allocation import Allocation  # noqa: E402
from anatomy_prune.pipeline.iterative import prune_iterative  # noqa: E402
from anatomy_prune.pipeline.requests import PruneRequest  # noqa: E402
from anatomy_prune.pipeline.step import prune_step  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402
from anatomy_prune.scores import make_calibration  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the sibling scripts, also when loaded by path
from decoders import _ppl  # noqa: E402


def iterative(loaded, sparsity: float, steps: int, args, exclude) -> tuple[object, float]:
    """`prune --iterations N`: the library's iterative path (pipeline.iterative), on a fresh calibration sample."""
    calib = make_calibration(loaded, args.calib_size, args.max_length, seed=0, exclude=exclude, batch_size=8)
    res = prune_iterative(calib, PruneRequest(method="calibrated", sparsity=sparsity, iterations=steps))
    print(f"  {steps} steps: {res.plan.params['iteration_sparsities']}", flush=True)
    return res.loaded, res.prune_s


def measure(args) -> dict:
    loaded = load_model(args.model, device="cpu")
    texts = lm_texts("imdb", args.eval_texts)
    dense = perplexity(loaded, texts, args.max_length, batch_size=8, progress=False)
    t0 = time.perf_counter()
    calib = make_calibration(loaded, args.calib_size, args.max_length, seed=0, exclude=texts, batch_size=8)
    once = prune_step(calib, PruneRequest(method="calibrated", sparsity=args.ffn))
    once_s = time.perf_counter() - t0
    ref = perplexity(once.loaded, texts, args.max_length, batch_size=8, progress=False)
    del once
    rows = [{"variant": "dense", **_ppl(dense)},
            {"variant": "ours, all at once", "prune_s": round(once_s, 1), **_ppl(ref),
             "vs_dense": paired_perplexity(ref, dense)}]
    print(f"dense {dense['perplexity']:.2f}; all at once {ref['perplexity']:.2f}", flush=True)
    t0 = time.perf_counter()       # the same statistics, each layer kept near the same width (a high floor)
    try:
        flat = prune_step(calib, PruneRequest(method="calibrated", sparsity=args.ffn,
                                              allocation=Allocation(floor=round(0.9 * (1.0 - args.ffn), 4))))
        p = perplexity(flat.loaded, texts, args.max_length, batch_size=8, progress=False)
        rows.append({"variant": "ours, all at once, floor 0.9 x kept share",
                     "prune_s": round(once_s + time.perf_counter() - t0, 1), **_ppl(p),
                     "vs_dense": paired_perplexity(p, dense), "vs_once": paired_perplexity(p, ref)})
        print(f"near-uniform widths: {p['perplexity']:.2f}", flush=True)
        del flat
    except UserError as exc:
        print(f"near-uniform widths: {exc}", flush=True)
    del calib
    for steps in args.steps:
        model, secs = iterative(loaded, args.ffn, steps, args, texts)
        p = perplexity(model, texts, args.max_length, batch_size=8, progress=False)
        rows.append({"variant": f"ours, iterative ({steps} steps)", "prune_s": round(secs, 1), **_ppl(p),
                     "vs_dense": paired_perplexity(p, dense), "vs_once": paired_perplexity(p, ref)})
        print(f"iterative {steps}: {p['perplexity']:.2f} ({secs:.0f} s)", flush=True)
    return {"model": args.model, "ffn_removed": args.ffn, "eval_texts": len(texts), "eval_tokens": dense["n_tokens"],
            "calib_size": args.calib_size, "max_length": args.max_length, "rows": rows}


def _test(t: dict | None) -> str:
    return f"{t['ratio']:.3f}x [{t['low']:.3f}-{t['high']:.3f}], p={t['p_value']:.2g}" if t else ""


def table(result: dict) -> str:
    lines = [f"FFN {result['ffn_removed']:.0%} removed; {result['eval_texts']} held-out reviews "
             f"({result['eval_tokens']} tokens), {result['calib_size']} calibration reviews", "",
             "| variant | perplexity [95%] | x dense [95%], p | vs all at once [95%], p | prune s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["interval"]
        lines.append(f"| {r['variant']} | {r['perplexity']:.1f} [{lo:.1f}-{hi:.1f}] | {_test(r.get('vs_dense'))} | "
                     f"{_test(r.get('vs_once'))} | {r.get('prune_s', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ffn", type=float, default=0.5, help="fraction of FFN neurons removed (default: 0.5)")
    p.add_argument("--steps", type=int, nargs="+", default=[2], help="iterative variants, in steps (default: 2)")
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--eval-texts", type=int, default=100)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default="runs/decoder-variants")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def job():
        if any(s < 2 for s in args.steps):
            raise UserError("--steps: each variant needs at least 2 steps (1 is ours all at once)")
        with RunFolder(args.out, "decoder-variants", {**vars(args), "out": None}, force=args.force) as rf:
            result = measure(args)
            rf.write_json("variants.json", result)
            rf.write_text("table.md", table(result) + "\n")
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
