"""`anatomy-prune` (also `python -m anatomy_prune`): argparse subcommands, each a thin call into the library.

Every subcommand is a pair: `_add_<name>(sub)` declares its arguments and `_run_<name>(args)` calls the
library. Bad input raises UserError, printed here as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from .cli_args import (_allocation, _big_model_args, _calib_args, _calib_spec, _compensation, _device_arg, _eval_args,
                       _eval_spec, _force_arg, _method_names, _method_param_args, _method_params, _model_arg,
                       _per_method, _targets, _task_args)
from .errors import UserError, exit_status, printable

log = logging.getLogger("anatomy_prune")


# --- finetune -----------------------------------------------------------------------------------

def _add_finetune(sub) -> None:
    from .train.finetune import PRESETS, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a backbone with the paper's binary head on IMDB",
                       description="Fine-tune a model with dropout + dense + sigmoid on its readout token "
                       "(CLS for encoders, last token for decoders) and write a run folder: DIR/model is a "
                       "model spec for every other command. The same settings again reuse the folder. "
                       "A --preset gives a whole recipe (paper-bert, paper-gpt2: the paper's models and data "
                       "from the hub); options given beside it override its values.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named recipe: " + ", ".join(PRESETS) + " (default: demo's values)")
    p.add_argument("--model", default=None, help=f"model spec (default: {d.model})")
    p.add_argument("--data", default=None, help=f"imdb, hf or a CSV/JSONL file (default: {d.data})")
    p.add_argument("--out", default="runs/finetune", help="run folder (default: runs/finetune)")
    for name in ("train_size", "val_size", "test_size", "batch_size", "max_length"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"(default: {getattr(d, name)})")
    p.add_argument("--truncation", choices=("head", "tail"), default=None,
                   help=f"which end of a long review to keep (default: {d.truncation})")
    p.add_argument("--epochs", type=float, default=None, help=f"(default: {d.epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"(default: {d.lr})")
    p.add_argument("--seed", type=int, default=None, help=f"(default: {d.seed})")
    p.add_argument("--train-embeddings", action="store_true", help="also train the word embeddings (slower)")
    p.add_argument("--force", action="store_true", help="train again even if the run folder exists")
    _device_arg(p)


def _run_finetune(args) -> int:
    from .pipeline.finetune import finetune
    from .train.finetune import preset

    given = {k: getattr(args, k) for k in ("model", "data", "train_size", "val_size", "test_size", "batch_size",
                                           "max_length", "truncation", "epochs", "lr", "seed")
             if getattr(args, k) is not None}
    if args.train_embeddings:
        given["freeze_embeddings"] = False
    cfg = preset(args.preset or "demo", **given)
    res = finetune(cfg, args.out, device=args.device, force=args.force, dtype=args.dtype)
    print(json.dumps({"run_dir": str(res.run_dir), "model": str(res.model_dir), "reused": res.reused,
                      **res.metrics}, indent=1))
    return 0


# --- evaluate -----------------------------------------------------------------------------------

def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a classifier (perplexity of a causal LM) and inference time",
                       description="Evaluate a fine-tuned (possibly pruned) classifier on the IMDB test split "
                       "or a whole user file: accuracy, wall-clock latency, parameters, FLOPs per token.")
    _model_arg(p)
    _eval_args(p)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    _device_arg(p)


def _run_evaluate(args) -> int:
    from .data.splits import eval_set
    from .evaluate.counts import size_report
    from .evaluate.metrics import evaluate
    from .models.loading import load_model
    from .runfolder import check_output_file, now_iso, write_json

    if args.json:
        check_output_file(args.json, "--json")
    data = eval_set(args.data, args.eval_size, args.split)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    metrics = evaluate(loaded, data, args.batch_size, args.max_length)  # accuracy, or a causal LM's perplexity
    metrics.update(size_report(loaded), model=args.model, data=args.data, created=now_iso())
    if args.json:
        write_json(args.json, metrics)
    long = ("ffn_widths", "text_nll", "text_tokens", "correct")
    print(json.dumps({k: v for k, v in metrics.items() if k not in long}, indent=1))
    return 0


# --- anatomy ------------------------------------------------------------------------------------

def _add_anatomy(sub) -> None:
    p = sub.add_parser("anatomy", help="layer and FFN-neuron similarity with the readout token, neuron graph",
                       description="The first paper's anatomy: cosine of every layer's readout token (CLS or last "
                       "token) and of every FFN neuron's output vector with the last layer's readout token; the "
                       "neurons above a threshold per input and layer, their graph and how much inputs share them. "
                       "Writes layer_similarity.json, neuron_similarity.npz, neurons.json, neuron_graph.graphml, "
                       "summary.json and figures/ under --out.")
    _model_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    p.add_argument("--inputs", default="probes", help="probes (the paper's ten sentences), imdb:N or hf:N (N test "
                   "reviews) or a text file with one input per line (default: probes)")
    p.add_argument("--threshold", type=float, default=0.35, help="neuron similarity threshold in [-1, 1] "
                   "(default: 0.35, the paper's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per input (default: the fine-tune's max length, else 256)")
    p.add_argument("--batch-size", type=int, default=16, help="inference batch size (default: 16)")
    p.add_argument("--no-figures", action="store_true", help="write the results only")
    _device_arg(p)


def _run_anatomy(args) -> int:
    from .pipeline.anatomy import anatomy_from_spec
    from .pipeline.requests import AnatomyRequest, AnatomySpec

    spec = AnatomySpec(args.threshold, args.max_length, args.batch_size, figures=not args.no_figures)
    req = AnatomyRequest(args.model, args.inputs, spec, device=args.device, dtype=args.dtype)
    s = anatomy_from_spec(req, args.out, force=args.force)
    print(json.dumps({"out": args.out, "n_inputs": s["n_inputs"], "n_truncated": s["n_truncated"],
                      "layer_similarity_mean": s["layer_similarity"]["mean"],
                      "mean_fraction_above": s["neurons"]["mean_fraction_above"],
                      "mean_jaccard": s["neurons"]["mean_jaccard"], "graph_nodes": s["graph"]["nodes"],
                      "load_s": s["load_s"], "total_s": s["total_s"]}, indent=1))
    return 0


# --- prune and sweep ------------------------------------------------------------------------------

def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune FFN neurons by a method (or a plan file), evaluate and save",
                       description="Load a model, make a pruning plan on a calibration sample, apply it (mask: zero "
                       "the neurons; physical: remove them), evaluate (accuracy, or perplexity for a causal LM) and "
                       "write DIR/plan.json, DIR/model/ and DIR/metrics.json. DIR is a model spec for every command. "
                       f"Methods: {_method_names()}.")
    _model_arg(p)
    p.add_argument("--method", default=None, help=f"one of: {_method_names()}")
    p.add_argument("--plan", default=None, help="apply this plan.json instead of making one")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of all FFN neurons to remove, in [0, 1)")
    p.add_argument("--iterations", type=int, default=1, help="iterative: remove the sparsity, or what --target-flops / "
                   "--target-params removes, in N equal shares, the statistics collected again on the pruned model before "
                   "each (physical; default: 1; 3 lowered SmolLM2's "
                   "perplexity 3%% at 50%% of the FFN, for one recalibration each; no gain measured at 20%% of its "
                   "parameters, nor on encoders)")
    p.add_argument("--mode", default=None, help="mask (zero, the paper's way) or physical (remove) (default: mask; "
                   "physical with a target or --quantize)")
    p.add_argument("--quantize", default=None, choices=("int8", "int8-all"),
                   help="then quantize the pruned model with torch's dynamic int8 Linear layers (CPU): int8 keeps the "
                   "FFN output projections in float (their inputs have outliers), int8-all quantizes every Linear")
    g = p.add_argument_group("a target instead of a sparsity (FFN neurons and attention heads pruned together)")
    g.add_argument("--target-flops", type=float, default=None,
                   help="keep at most this fraction of the dense FLOPs per token, e.g. 0.5")
    g.add_argument("--target-params", type=float, default=None,
                   help="keep at most this fraction of the dense parameters (embeddings count), e.g. 0.8")
    g.add_argument("--target-speedup", type=float, default=None,
                   help="measured speedup to reach, e.g. 2.0: a latency cost model is fitted by timing the model's "
                   "own shapes on this device at --target-batch x --target-length and written to the run folder; "
                   "the plan is then timed and its budget corrected until it measures within 3%% of the target")
    g.add_argument("--cost-model", default=None, metavar="FILE",
                   help="with --target-speedup: reuse the latency model an earlier run wrote (its cost_model.json) "
                   "instead of timing again, so the same command gives the same plan")
    g.add_argument("--check-speedup", action=argparse.BooleanOptionalAction, default=None,
                   help="time the plan against dense and correct it (default: on, off with --cost-model)")
    g.add_argument("--target-batch", type=int, default=32, help="batch size the target is for (default: 32)")
    g.add_argument("--target-length", type=int, default=128, help="tokens per input the target is for (default: 128)")
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    _method_param_args(p)
    _calib_args(p)
    _eval_args(p)
    _device_arg(p)
    _big_model_args(p)


def _run_prune(args) -> int:
    from .pipeline.prune import prune
    from .pipeline.requests import PruneRequest

    target = None
    given = {k: getattr(args, f"target_{k}") for k in ("flops", "params", "speedup")}
    if args.cost_model is not None and given["speedup"] is None:
        raise UserError("--cost-model FILE (a run folder's cost_model.json) goes with --target-speedup")
    if args.check_speedup is not None and given["speedup"] is None:
        raise UserError("--check-speedup / --no-check-speedup go with --target-speedup")
    if any(v is not None for v in given.values()):
        target = {"batch_size": args.target_batch, "seq_len": args.target_length, "cost_model": args.cost_model,
                  **{k: v for k, v in given.items() if v is not None},
                  **({} if args.check_speedup is None else {"check": args.check_speedup})}
        args.method = args.method or ("calibrated" if args.plan is None else None)
    if args.mode is None:
        args.mode = "physical" if (target or args.quantize or args.iterations > 1) else "mask"
    req = PruneRequest(model=args.model, method=args.method, sparsity=args.sparsity, params=_method_params(args),
                       plan_file=args.plan, mode=args.mode, compensate=args.compensate, allocation=_allocation(args),
                       compensation=_compensation(args),
                       target=target, quantize=args.quantize, eval=_eval_spec(args), calib=_calib_spec(args),
                       device=args.device, dtype=args.dtype, layerwise=args.layerwise, device_map=args.device_map,
                       max_memory=args.max_memory, offload_folder=args.offload_folder,
                       weights_dtype=args.weights_dtype, max_shard_size=args.max_shard_size,
                       iterations=args.iterations)
    m = prune(req, args.out, force=args.force)
    keys = ("accuracy", "accuracy_interval", "perplexity", "latency_s", "n_eval", "sparsity", "neurons_removed",
            "heads_removed", "params", "flops_per_token", "flops_ratio", "measured_speedup", "prune_s", "peak_mem_mb")
    print(json.dumps({"out": args.out, "method": m["method"], "mode": m["mode"],
                      **{k: m[k] for k in keys if k in m}}, indent=1))
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="every method at every sparsity on the same test reviews, with figures",
                       description="Load the model once, compute calibration statistics once, and evaluate every "
                       "(method, sparsity) plus the dense baseline; writes DIR/results.json, DIR/sweep.json, "
                       "DIR/plans/ and DIR/figures/ (accuracy and time against sparsity, neurons per layer). "
                       "--config runs a grid of method parameters, e.g. configs/paper_figure5a.toml.")
    _model_arg(p)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from: {_method_names()} (default: random,magnitude,strategy,activation; "
                   "none when --config is given)")
    p.add_argument("--sparsities", default="0.1,0.3,0.5,0.7,0.9",
                   help="comma-separated fractions in [0, 1); 0 is the dense baseline (default: 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--mode", default="mask", help="mask or physical (default: mask)")
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    p.add_argument("--config", default=None, help="TOML grid of method parameters (configs/paper_figure5a.toml)")
    p.add_argument("--report", default=None, help="also write a markdown report to this file")
    p.add_argument("--targets", default=None,
                   help="points pruned to a constraint instead of a sparsity, comma-separated: flops:0.5 (keep half the "
                   "FLOPs), speedup:2 (measured latency, batch 32 x 128); calibrated, heads and neurons together")
    p.add_argument("--quantize", default=None, choices=("int8", "int8-all"),
                   help="stack int8 (dynamic, CPU) on every point; int8 keeps the FFN output projections float")
    p.add_argument("--seeds", type=int, default=5,
                   help="seeds of a method whose scores are random draws (random): each point runs this many "
                   "times; results give the mean, the standard deviation and each seed (default: 5)")
    p.add_argument("--restart", action="store_true",
                   help="start from scratch (default: a stopped sweep with the same settings resumes)")
    p.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="where the points run: local (in this process, in order) or ray (one Ray task per point; "
                   'needs pip install "anatomy-prune[cluster]") (default: local)')
    p.add_argument("--address", default=None,
                   help="with --executor ray: join this Ray cluster (HEAD:6379, from `ray start --head --port 6379`) "
                   "instead of starting a local Ray instance")
    p.add_argument("--num-cpus-per-task", type=float, default=1,
                   help="with --executor ray: CPUs per point (also its torch threads) (default: 1)")
    p.add_argument("--num-gpus-per-task", type=float, default=0,
                   help="with --executor ray: GPUs per point, e.g. 1 or 0.5 (default: 0)")
    _method_param_args(p)
    _calib_args(p)
    _eval_args(p)
    _device_arg(p)


def _run_sweep(args) -> int:
    from .pipeline.report import write_report
    from .pipeline.requests import SweepConfig
    from .pipeline.sweep import run_sweep
    from .pipeline.sweep_schema import parse_list
    from .runfolder import check_output_file

    if args.report:
        check_output_file(args.report, "--report")
    if args.methods is None:
        args.methods = "" if args.config else "random,magnitude,strategy,activation"
    methods = parse_list(args.methods, "methods") if args.methods else []
    cfg = SweepConfig(model=args.model, methods=methods, sparsities=parse_list(args.sparsities, "sparsities", float),
                      mode=args.mode, params=_per_method(methods, args), config=args.config,
                      targets=_targets(args.targets), compensate=args.compensate, compensation=_compensation(args),
                      quantize=args.quantize,
                      seeds=args.seeds, eval=_eval_spec(args), calib=_calib_spec(args), device=args.device,
                      dtype=args.dtype, executor=args.executor, address=args.address,
                      num_cpus_per_task=args.num_cpus_per_task, num_gpus_per_task=args.num_gpus_per_task)
    rows = run_sweep(cfg, args.out, force=args.force, resume=not args.restart)
    if args.report:
        write_report(args.out, args.report)
    metric = "accuracy" if "accuracy" in rows[0] else "perplexity"
    print(json.dumps({"out": args.out, "rows": [
        {"method": r["method"], "sparsity": r["sparsity"], "error": r["error"]} if "error" in r else
        {"method": r["method"], "sparsity": round(r["sparsity"], 4), metric: r[metric],
         "latency_s": round(r["latency_s"], 3)} for r in rows]}, indent=1))
    return 0


# --- finepruning and redundancy -------------------------------------------------------------

def _add_finepruning(sub) -> None:
    from .finepruning.train import METHODS, FinepruneConfig

    d = FinepruneConfig(model="")
    p = sub.add_parser("finepruning", help="prune FFN neurons while fine-tuning (random, magnitude, movement, GUM)",
                       description="Fine-prune on the cubic schedule (dense warm-up, cubic decay, final stretch at "
                       "the target) with masks during training, then remove the pruned neurons physically. Writes "
                       "DIR/results.json (metric, sparsity, time, per-layer sensitivity and uniqueness), "
                       "DIR/plan.json, DIR/redundancy.json, DIR/model/ (a model spec) and DIR/figures/.")
    _model_arg(p)
    p.add_argument("--method", choices=METHODS, required=True, help="random, magnitude, movement or gum")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of all FFN neurons removed, in [0, 1)")
    p.add_argument("--steps", type=int, required=True, help="training steps (the schedule needs at least 10 with "
                   "the default --warmup 0.1)")
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    p.add_argument("--selection", choices=("local", "global"), default=None,
                   help="Top_v per layer (local) or over all layers (global) (default: global for gum, else local)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"weights' learning rate (default: {d.lr})")
    p.add_argument("--mask-lr", type=float, default=d.mask_lr, help=f"scores' learning rate (default: {d.mask_lr})")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"dense warm-up fraction w/T; the final stretch is 3w (default: {d.warmup})")
    p.add_argument("--lambda-r", type=float, default=d.lambda_r, help=f"gum: regulariser weight (default: {d.lambda_r})")
    p.add_argument("--lambda-u", type=float, default=d.lambda_u, help=f"gum: uniqueness weight (default: {d.lambda_u})")
    p.add_argument("--rho", type=float, default=d.rho, help=f"gum: running-similarity factor (default: {d.rho})")
    p.add_argument("--train-embeddings", action="store_true", help="also train the word embeddings (slower)")
    p.add_argument("--no-dense-eval", action="store_true", help="do not evaluate the starting model")
    _task_args(p, d)


def _run_finepruning(args) -> int:
    from .finepruning.train import FinepruneConfig, finepruning

    cfg = FinepruneConfig(model=args.model, method=args.method, sparsity=args.sparsity, steps=args.steps,
                          task=args.task, text=args.text, data=args.data, selection=args.selection,
                          batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, mask_lr=args.mask_lr,
                          warmup=args.warmup, lambda_r=args.lambda_r, lambda_u=args.lambda_u, rho=args.rho,
                          train_size=args.train_size, eval_size=args.eval_size, analysis_size=args.analysis_size,
                          freeze_embeddings=not args.train_embeddings, eval_dense=not args.no_dense_eval,
                          seed=args.seed)
    r = finepruning(cfg, args.out, device=args.device, figures=not args.no_figures, force=args.force, dtype=args.dtype).results
    print(json.dumps({"out": args.out, "method": r["method"], "selection": r["selection"], r["metric"]: r[r["metric"]],
                      "dense_" + r["metric"]: r["dense_" + r["metric"]], "sparsity": round(r["sparsity"], 4),
                      "steps": r["steps"], "train_s": round(r["time"]["train_s"], 1),
                      "sens_sum": r["redundancy"]["sens_sum"], "unique": r["redundancy"]["unique"]}, indent=1))
    return 0


def _add_redundancy(sub) -> None:
    from .finepruning.train import FinepruneConfig

    d = FinepruneConfig(model="")
    p = sub.add_parser("redundancy", help="sensitivity and uniqueness of every FFN neuron of a model or a plan",
                       description="The second paper's redundancy measures on a model (a pruned folder included), "
                       "or on a model after physically applying --plan: per-neuron first-order sensitivity and "
                       "uncentred-cosine uniqueness (cos >= 0.8), per layer. Writes DIR/redundancy.json and figures.")
    _model_arg(p)
    p.add_argument("--plan", default=None, help="apply this plan.json (physically) before measuring")
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    _task_args(p, d)


def _run_redundancy(args) -> int:
    from .finepruning.train import FinepruneConfig
    from .pipeline.redundancy import redundancy_job

    cfg = FinepruneConfig(model=args.model, task=args.task, text=args.text, data=args.data, steps=100,
                          batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
                          eval_size=args.eval_size, analysis_size=args.analysis_size, seed=args.seed)
    red = redundancy_job(args.out, cfg, plan_file=args.plan, device=args.device,
                         figures=not args.no_figures, force=args.force, dtype=args.dtype)
    print(json.dumps({"out": args.out, "neurons": red["neurons"], "sens_sum": red["sens_sum"],
                      "unique": red["unique"], "n_sequences": red["n_sequences"]}, indent=1))
    return 0


# --- demo ---------------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the default model, offline: fine-tune, evaluate, ...",
                       description="Fine-tune the default encoder (minilm) on real IMDB reviews and evaluate it, "
                       "then run the anatomy and pruning steps; writes everything under --out.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    _force_arg(p)
    p.add_argument("--smoke", action="store_true", help="tiny model and a few reviews: checks the pipeline in seconds")
    _device_arg(p)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, smoke=args.smoke, device=args.device, force=args.force, dtype=args.dtype)
    return 0


# --- figures ------------------------------------------------------------------------------------

def _add_figures(sub) -> None:
    p = sub.add_parser("figures", help="gather the PNG figures of finished runs into one folder",
                       description="Redraw anatomy figures from their saved results and copy every run's "
                       "figures/*.png into --out, named after the folder they came from.")
    p.add_argument("--run", action="append", required=True, help="a run folder (repeatable), e.g. runs/demo")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    _force_arg(p)


def _run_figures(args) -> int:
    from .pipeline.report import collect_figures

    print(f"{len(collect_figures(args.run, args.out, force=args.force))} figures written to {args.out}")
    return 0


# --- export -------------------------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a (pruned) model to ONNX for ONNX Runtime",
                       description="Export a classifier (bert-like, distilbert, gpt2, llama-like) or a causal LM's forward "
                       "(llama-like, gpt2; no KV cache) to DIR/model.onnx with dynamic batch and sequence axes, "
                       "per-layer FFN widths and head counts kept; DIR also holds the tokenizer and deploy.json "
                       "(inputs, outputs, readout, base model, the measured difference from PyTorch). Needs "
                       'pip install "anatomy-prune[deploy]".')
    _model_arg(p)
    p.add_argument("--format", default="onnx", choices=("onnx",), help="output format (default: onnx)")
    p.add_argument("--out", required=True, help="output folder")
    _force_arg(p)
    p.add_argument("--quantize", default=None, choices=("int8",),
                   help="int8 = ONNX Runtime's dynamic quantization of the MatMul weights")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"),
                   help="torch.onnx.export's path: torchscript (seconds) or dynamo (needs onnxscript; minutes) "
                   "(default: torchscript)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14-20 (default: 17)")


def _run_export(args) -> int:
    from .pipeline.export import ExportRequest, export

    meta = export(ExportRequest(model=args.model, format=args.format, quantize=args.quantize,
                                exporter=args.exporter, opset=args.opset), args.out, force=args.force)
    print(json.dumps({"out": args.out, "kind": meta["kind"], "family": meta["family"], "quantize": meta["quantize"],
                      "bytes": meta["bytes"], "export_s": round(meta["export_s"], 2),
                      "max_abs_diff": {k: v["max_abs"] for k, v in meta["check"].items() if isinstance(v, dict)}},
                     indent=1))
    return 0


# --- wiring -------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "finetune": (_add_finetune, _run_finetune),
    "evaluate": (_add_evaluate, _run_evaluate),
    "anatomy": (_add_anatomy, _run_anatomy),
    "prune": (_add_prune, _run_prune),
    "sweep": (_add_sweep, _run_sweep),
    "finepruning": (_add_finepruning, _run_finepruning),
    "redundancy": (_add_redundancy, _run_redundancy),
    "demo": (_add_demo, _run_demo),
    "figures": (_add_figures, _run_figures),
    "export": (_add_export, _run_export),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong and where to look), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {printable(message)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="anatomy-prune", description=__doc__.splitlines()[0])
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
    logging.captureWarnings(True)  # library warnings (torch, transformers) are log records: shown with --verbose
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        return exit_status(lambda: COMMANDS[args.command][1](args), f"anatomy-prune {args.command}")
    except KeyboardInterrupt:
        print(f"anatomy-prune {args.command}: interrupted; no output was committed (run the same command again: "
              "it completes a stopped commit, and a stopped sweep resumes where it stopped)", file=sys.stderr)
        return 130
