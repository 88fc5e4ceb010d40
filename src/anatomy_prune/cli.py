"""`anatomy-prune` (also `python -m anatomy_prune`): argparse subcommands, each a thin call into the library.

Every subcommand is a pair: `_add_<name>(sub)` declares its arguments and `_run_<name>(args)` calls the
library. Bad input raises UserError, printed here as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError

log = logging.getLogger("anatomy_prune")


# --- shared argument helpers ---------------------------------------------------------------------

def _model_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="model spec: alias (minilm, smollm2, tiny-bert, tiny-gpt2, tiny-llama), folder or hub id"
                   + (f" (default: {default})" if default else ""))


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when present, else CPU)")


def _eval_args(p: argparse.ArgumentParser, eval_size: int = 1000) -> None:
    p.add_argument("--data", default="imdb", help="imdb (offline CSV), hf (hub IMDB) or a CSV/JSONL file "
                   "with text and label columns (default: imdb)")
    p.add_argument("--eval-size", type=int, default=eval_size, help=f"test reviews to evaluate (default: {eval_size})")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size (default: 32)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per input (default: the fine-tune's max length, else 256)")


def default_max_length(loaded, given: int | None) -> int:
    if given is not None:
        return given
    return int(loaded.info.get("max_length") or loaded.info.get("finetune", {}).get("max_length") or 256)


# --- finetune -----------------------------------------------------------------------------------

def _add_finetune(sub) -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a backbone with the paper's binary head on IMDB",
                       description="Fine-tune a model with dropout + dense + sigmoid on its readout token "
                       "(CLS for encoders, last token for decoders) and write a run folder: DIR/model is a "
                       "model spec for every other command. The same settings again reuse the folder.")
    _model_arg(p, d.model)
    p.add_argument("--data", default=d.data, help="imdb, hf or a CSV/JSONL file (default: imdb)")
    p.add_argument("--out", default="runs/finetune", help="run folder (default: runs/finetune)")
    for name in ("train_size", "val_size", "test_size", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"(default: {getattr(d, name)})")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"(default: {d.max_length})")
    p.add_argument("--truncation", choices=("head", "tail"), default=d.truncation,
                   help=f"which end of a long review to keep (default: {d.truncation})")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"(default: {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--train-embeddings", action="store_true", help="also train the word embeddings (slower)")
    p.add_argument("--force", action="store_true", help="train again even if the run folder exists")
    _device_arg(p)


def _run_finetune(args) -> int:
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model=args.model, data=args.data, train_size=args.train_size, val_size=args.val_size,
                         test_size=args.test_size, max_length=args.max_length, truncation=args.truncation, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         freeze_embeddings=not args.train_embeddings)
    res = finetune(cfg, args.out, device=args.device, force=args.force)
    print(json.dumps({"run_dir": str(res.run_dir), "model": str(res.model_dir), "reused": res.reused,
                      **res.metrics}, indent=1))
    return 0


# --- evaluate -----------------------------------------------------------------------------------

def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and inference time of a classifier on the test reviews",
                       description="Evaluate a fine-tuned (possibly pruned) classifier on the IMDB test split "
                       "or a whole user file: accuracy, wall-clock latency, parameters, FLOPs per token.")
    _model_arg(p)
    _eval_args(p)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    _device_arg(p)


def _run_evaluate(args) -> int:
    from .data import eval_set
    from .evaluate import evaluate_classifier, size_report
    from .io import now_iso, write_json
    from .models import load_model

    loaded = load_model(args.model, device=args.device)
    data = eval_set(args.data, args.eval_size)
    metrics = evaluate_classifier(loaded, data, args.batch_size, default_max_length(loaded, args.max_length))
    metrics.update(size_report(loaded), model=args.model, data=args.data, created=now_iso())
    if args.json:
        write_json(args.json, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "ffn_widths"}, indent=1))
    return 0


# --- demo ---------------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the default model, offline: fine-tune, evaluate, ...",
                       description="Fine-tune the default encoder (minilm) on real IMDB reviews and evaluate it, "
                       "then run the anatomy and pruning steps; writes everything under --out.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--smoke", action="store_true", help="tiny model and a few reviews: checks the pipeline in seconds")
    _device_arg(p)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, smoke=args.smoke, device=args.device)
    return 0


# --- wiring -------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "finetune": (_add_finetune, _run_finetune),
    "evaluate": (_add_evaluate, _run_evaluate),
    "demo": (_add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anatomy-prune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        return COMMANDS[args.command][1](args) or 0
    except UserError as exc:
        print(f"anatomy-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
