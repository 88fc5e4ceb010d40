"""Argument groups shared by several subcommands of the CLI (cli.py)."""
from __future__ import annotations

import argparse

from .errors import UserError


def _model_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="model spec: alias (minilm, smollm2, tiny-bert, tiny-gpt2, tiny-llama), folder or hub id"
                   + (f" (default: {default})" if default else ""))


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="write into an --out folder that holds another run (its outputs of the same names are "
                   "replaced; files anatomy-prune did not write are never touched)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when present, else CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="compute precision of forward passes (autocast; weights stay float32, statistics are "
                   "kept in float32): auto = float16 on a CUDA GPU, float32 on a CPU (default: auto)")


def _eval_args(p: argparse.ArgumentParser, eval_size: int = 1000) -> None:
    p.add_argument("--data", default="imdb", help="imdb (offline CSV), hf (hub IMDB) or a CSV/JSONL file "
                   "with text and label columns (default: imdb)")
    p.add_argument("--eval-size", type=int, default=eval_size, help=f"reviews to evaluate (default: {eval_size})")
    p.add_argument("--split", choices=("test", "heldout"), default="test",
                   help="IMDB split to evaluate on: test (1,000 reviews) or heldout (5,000 no step has seen; "
                   "for comparisons that need a small standard error) (default: test)")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size (default: 32)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per input (default: the fine-tune's max length, else 256)")


def _method_names() -> str:
    from .scores import scorer_names
    return ", ".join(scorer_names())


def _calib_args(p: argparse.ArgumentParser) -> None:
    from .data.splits import CALIB_SIZE
    from .scores.calibration import CALIB_MAX_LENGTH
    p.add_argument("--calib-size", type=int, default=CALIB_SIZE,
                   help=f"calibration reviews, a seeded sample of the IMDB training split (default: {CALIB_SIZE})")
    p.add_argument("--calib-max-length", type=int, default=CALIB_MAX_LENGTH,
                   help=f"tokens per calibration review (default: {CALIB_MAX_LENGTH})")
    p.add_argument("--calib-data", default=None, help="imdb or hf (their calibration split) or a text file, one text "
                   "per line (default: the --data IMDB, else imdb)")
    p.add_argument("--compensate", action="store_true",
                   help="refit the kept neurons' down projection on calibration activations (--compensation refit)")
    p.add_argument("--compensation", choices=("refit", "bias"), default=None,
                   help="compensate the pruned model: refit (ridge least squares of the removed inputs from the kept "
                   "ones) or bias (their means folded into the output projection's bias, FLAP's) (default: the "
                   "method's own: refit for calibrated, none for the others)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="then refit every output projection toward the dense model's residual stream, block by block "
                   "(default: on for calibrated on a causal LM; asking for it on another method also compensates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample and random choices (default: 0)")


def _method_param_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method parameters (only those given are passed; a method refuses ones it lacks)")
    g.add_argument("--alpha", type=float, default=None, help="strategy: alpha (then the sparsity is what it is)")
    g.add_argument("--beta", type=float, default=None, help="strategy, encoders: beta (default 0.001, the paper's)")
    g.add_argument("--focus", default=None, help="strategy: focusing blocks, e.g. 2,3,4,5 (alpha x3 there; default: "
                   "the paper's 4,6,8,10,11 of 12 mapped by depth, decoders the last block)")
    g.add_argument("--no-protect", action="store_true", help="random: do not keep the anatomy's important neurons")
    g.add_argument("--protect-threshold", type=float, default=None,
                   help="random: similarity above which a neuron is important (default: 0.35)")
    g.add_argument("--allocation", choices=("local", "global"), default=None,
                   help="random / magnitude / activation: same fraction per layer (local, default) or one "
                   "normalised ranking of all layers (global)")
    g.add_argument("--floor", type=float, default=None, help="global allocation: least fraction a layer keeps")
    g.add_argument("--normalize", choices=("none", "mean", "standard"), default=None,
                   help="global allocation: each layer's scores as they are, over their mean, or standardised "
                   "(FLAP's) before one ranking (default: the method's; mean for random / magnitude / activation)")
    g.add_argument("--multiple-of", type=int, default=None,
                   help="round each layer's kept width up to a multiple of K (faster kernels)")
    g.add_argument("--head-sparsity", type=float, default=None,
                   help="methods that score heads (calibrated): also remove this fraction of attention head units")


def _method_params(args) -> dict:
    """The method parameters given (allocation options are the request's: see _allocation)."""
    from .pipeline.sweep_schema import parse_list
    params = {}
    if args.alpha is not None:
        params["alpha"] = args.alpha
    if args.beta is not None:
        params["beta"] = args.beta
    if args.focus is not None:
        params["focus"] = parse_list(args.focus, "focus", int)
    if args.no_protect:
        params["protect"] = False
    if args.protect_threshold is not None:
        params["threshold"] = args.protect_threshold
    return params


def _allocation(args):
    from .pipeline.allocation import Allocation
    return Allocation(scope=args.allocation, floor=args.floor, normalize=args.normalize,
                      multiple_of=1 if args.multiple_of is None else args.multiple_of, head_sparsity=args.head_sparsity)


def _compensation(args):
    """--compensation KIND (with --compensate, refit), or None: the method's own."""
    from .pipeline.compensation import Compensation
    if args.compensate and args.compensation not in (None, "refit"):
        raise UserError("--compensate is --compensation refit; give one of them")
    if args.compensation is None and args.tune is None:
        return None
    return Compensation(kind=args.compensation, tune=args.tune)


def _eval_spec(args):
    from .pipeline.requests import EvalSpec
    return EvalSpec(data=args.data, size=args.eval_size, split=args.split, batch_size=args.batch_size,
                    max_length=args.max_length)


def _calib_spec(args):
    from .pipeline.requests import CalibSpec
    return CalibSpec(size=args.calib_size, max_length=args.calib_max_length, data=args.calib_data, seed=args.seed)


def _task_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--task", choices=("lm", "imdb"), default=d.task,
                   help="lm: causal-LM loss, perplexity on held-out text (decoders); imdb: binary classification, "
                   f"BCE, accuracy (default: {d.task})")
    p.add_argument("--text", default=d.text, help="lm: imdb (review text, offline), wikitext (hub) or a text file, "
                   f"one text per line (default: {d.text})")
    p.add_argument("--data", default=d.data, help="imdb task: imdb, hf or a CSV/JSONL file with text and label "
                   f"(default: {d.data})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: the fine-tune's max length, else 128)")
    p.add_argument("--train-size", type=int, default=d.train_size, help=f"training texts (default: {d.train_size})")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help=f"held-out texts (default: {d.eval_size})")
    p.add_argument("--analysis-size", type=int, default=d.analysis_size,
                   help=f"sequences for sensitivity and uniqueness (default: {d.analysis_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--no-figures", action="store_true", help="write the results only")
    _device_arg(p)


def _big_model_args(p) -> None:
    g = p.add_argument_group("big models (docs: DEVELOPING.md, pipeline/layerwise.py)")
    g.add_argument("--layerwise", nargs="?", const="sequential", default=None, choices=("sequential", "dense"),
                   help="prune one block at a time with the calibrated recipe's error term (no Fisher), local "
                   "allocation, least-squares compensation and physical removal (--method calibrated --mode "
                   "physical); sequential (default): each block sees the pruned blocks' outputs; dense: the dense "
                   "model's (equal to the all-at-once path)")
    g.add_argument("--device-map", default=None,
                   help="place the model with accelerate: auto, balanced, sequential or a device (cpu, cuda:0)")
    g.add_argument("--max-memory", default=None,
                   help="memory per device for --device-map, e.g. 0:14GiB,cpu:30GiB (checked against one block)")
    g.add_argument("--offload-folder", default=None, help="folder for weights --device-map puts on disk")
    g.add_argument("--weights-dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                   help="dtype the weights are loaded in; auto: as the checkpoint stores them (default: float32)")
    g.add_argument("--max-shard-size", default=None,
                   help="save the pruned weights in shards of at most this size, e.g. 2GB (default: transformers')")


def _per_method(methods: list[str], args) -> dict:
    """The method parameters (and allocation options) given, each to the methods that take it."""
    from .pipeline.allocation import takes
    from .scores import get_scorer

    extra = {**_method_params(args), **{k: v for k in ("allocation", "floor", "normalize", "multiple_of", "head_sparsity")
                                         if (v := getattr(args, k)) is not None}}
    params = {}
    for name in methods:
        scorer = get_scorer(name)
        taken = {k: v for k, v in extra.items() if k in scorer.params or k in takes(name)}
        if taken:
            params[name] = taken
    unused = set(extra) - {k for v in params.values() for k in v}
    if unused:
        raise UserError(f"no method in --methods takes {sorted(unused)}")
    return params


def _targets(text: str | None) -> list[dict]:
    """'flops:0.5,speedup:2' -> [{"flops": 0.5}, {"speedup": 2.0}]; a one-line UserError otherwise."""
    out = []
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        kind, _, value = item.partition(":")
        try:
            if kind not in ("flops", "speedup"):
                raise ValueError
            out.append({kind: float(value)})
        except ValueError:
            raise UserError(f"--targets: '{item}' is not flops:F or speedup:S") from None
    return out
