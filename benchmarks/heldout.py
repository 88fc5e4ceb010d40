"""Held-out check: pruning methods at one sparsity on IMDB reviews that neither the fine-tune nor the
calibration saw, more of them than the 1,000-review test split, so that small gaps can be told from noise.

    .venv/bin/python benchmarks/heldout.py              # 10%, 5,000 reviews, 10 min on 2 quiet cores
    .venv/bin/python benchmarks/heldout.py --sparsity 0.5 --methods calibrated,strategy --n 2000

The reviews: IMDB shuffled with seed 0 as data.split does; the first --skip of that order are the test,
validation and training reviews of the fine-tune (runs/demo: 1,000 + 500 + 4,000 = 5,500), so the next
--n reviews that are not calibration texts are unseen. Plans as in benchmarks/calibrated.py (the
`calibrated` plan compensated), then apply.physical and evaluate_classifier. Writes --out/heldout.json.
"""
from __future__ import annotations

import argparse
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from anatomy_prune.data import TextSet, eval_set, read_imdb_offline
from anatomy_prune.errors import UserError
from anatomy_prune.evaluate import evaluate_classifier
from anatomy_prune.models import load_model
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.runfolder import write_json
from anatomy_prune.scores import SCORERS as METHODS, make_calibration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="runs/demo/model", help="fine-tuned classifier (default: runs/demo/model)")
    p.add_argument("--methods", default="calibrated,strategy,activation", help="comma-separated registered methods")
    p.add_argument("--sparsity", type=float, default=0.1, help="(default: 0.1)")
    p.add_argument("--n", type=int, default=5000, help="unseen reviews (default: 5000)")
    p.add_argument("--skip", type=int, default=5500, help="reviews used by the fine-tune (default: 5500)")
    p.add_argument("--calib-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--max-length", type=int, default=128, help="(default: 128)")
    p.add_argument("--out", default="runs/heldout", help="(default: runs/heldout)")
    return p


def unseen_reviews(skip: int, n: int, banned: set[str]) -> TextSet:
    full = read_imdb_offline()
    order = list(range(len(full)))
    random.Random(0).shuffle(order)
    ids = [i for i in order[skip:] if full.texts[i] not in banned][:n]
    if len(ids) < n:
        raise UserError(f"only {len(ids)} unseen reviews after --skip {skip}; ask for fewer with --n")
    return TextSet([full.texts[i] for i in ids], [full.labels[i] for i in ids])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
        if not 0 < args.sparsity < 1:
            raise UserError(f"--sparsity must be between 0 and 1, got {args.sparsity}")
        torch.set_num_threads(2)
        loaded = load_model(args.model, device="cpu")
        if loaded.kind != "classifier":
            raise UserError(f"--model must be a fine-tuned classifier (runs/demo/model), not a {loaded.kind}")
        test = eval_set("imdb", 1000)
        calib = make_calibration(loaded, args.calib_size, args.max_length, seed=0, exclude=test.texts, batch_size=32)
        data = unseen_reviews(args.skip, args.n, set(calib.texts))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [{"method": "dense", "accuracy": evaluate_classifier(loaded, data, 64, args.max_length,
                                                                progress=False)["accuracy"]}]
    print(f"dense      {100 * rows[0]['accuracy']:.2f}", flush=True)
    for method in methods:
        pruned = prune_step(loaded, calib, method, sparsity=args.sparsity, mode="physical").loaded
        acc = evaluate_classifier(pruned, data, 64, args.max_length, progress=False)["accuracy"]
        rows.append({"method": method, "accuracy": acc})
        print(f"{method:10s} {100 * acc:.2f}", flush=True)
    dense_acc = rows[0]["accuracy"]
    write_json(Path(args.out) / "heldout.json", {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": vars(args),
        "n_eval": len(data), "standard_error_points": round(100 * (dense_acc * (1 - dense_acc) / len(data)) ** 0.5, 2),
        "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
