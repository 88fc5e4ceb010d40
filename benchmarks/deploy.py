"""Deploy: the dense and pruned demo models where engineers run them. Each model (dense, and pruned to 1.5x, 2x
and 3x speedup targets the way the README's peers table was made: `anatomy-prune prune --target-speedup X`,
calibrated scores for heads and FFN neurons, the method's least-squares compensation, 128 calibration reviews)
runs in four engines: PyTorch eager float32, PyTorch eager int8 (the library's --quantize int8: torch's dynamic
int8 Linear layers), ONNX Runtime float32 and ONNX Runtime int8 (`anatomy-prune export [--quantize int8]`).

All 16 variants are timed interleaved in one run per shape (batch 1 x 128 tokens, a request; batch 32 x 128, a
batch job), on fixed token ids, with the same number of threads in both runtimes; every speedup is against dense
PyTorch float32 from the same rounds, with the round-by-round ratios' quartiles. Each variant's accuracy is
measured on the same held-out reviews (1,000 by default: the machine is shared; --eval-size 5000 for the
issue's size), with a Wilson interval and McNemar against dense PyTorch float32.

    make deploy-bench
    .venv/bin/python benchmarks/deploy.py --model runs/demo/finetune --out runs/deploy [--eval-size 1000]

Writes --out/deploy.json, --out/table.md and the exported folders (--out/onnx/); the pruned models go to their
own run folders, --out-pruned/TARGETx (kept if a later step fails, and reused by a rerun with the same settings).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ENGINES = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8")
TARGETS = [1.5, 2.0, 3.0]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/finetune", help="the fine-tuned classifier (a run folder)")
    p.add_argument("--out", default="runs/deploy")
    p.add_argument("--force", action="store_true")
    p.add_argument("--targets", type=float, nargs="+", default=TARGETS, help="speedup targets (default: 1.5 2 3)")
    p.add_argument("--target-kind", choices=("speedup", "flops"), default="speedup",
                   help="speedup: measured latency (the default); flops: keep 1/target of the FLOPs (tiny smoke runs)")
    p.add_argument("--pruned", nargs="*", default=None,
                   help="existing pruned run folders to use instead of pruning (one per target, in order)")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out reviews per variant (default: 1000)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--shapes", nargs="+", default=["1x128", "32x128"], help="BATCHxTOKENS (default: 1x128 32x128)")
    p.add_argument("--repeats", type=int, nargs="+", default=[10, 5],
                   help="timed rounds per shape, in the order of --shapes (default: 10 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of both runtimes (default: 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from anatomy_prune.errors import UserError, exit_status
    from anatomy_prune.evaluate.timing import load_average, machine_info
    from anatomy_prune.runfolder import RunFolder

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force")}

    def job():
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
        if len(args.repeats) != len(shapes):
            raise UserError("give one --repeats per --shapes entry")
        with RunFolder(args.out, "deploy-benchmark", settings, force=args.force) as rf:
            load_before, t0 = load_average(), time.perf_counter()
            runs = prune_targets(args, rf)
            variants, exports = build_variants(args, runs, rf)
            timings = {f"{b}x{n}": time_variants(variants, b, n, reps, args)
                       for (b, n), reps in zip(shapes, args.repeats)}
            accuracy = accuracy_of(variants, args)
            result = {"machine": machine_info(), "ort_threads": args.threads, "load_before": load_before,
                      "load_after": load_average(), "wall_s": time.perf_counter() - t0, "settings": settings,
                      "models": {k: v["info"] for k, v in runs.items()}, "exports": exports,
                      "timings": timings, "accuracy": accuracy}
            rf.write_json("deploy.json", result)
            rf.write_text("table.md", tables(result))
        print(tables(result))

    return exit_status(job)


# --- models --------------------------------------------------------------------------------------

def prune_targets(args, rf) -> dict:
    """The dense model and one pruned model per target, made as the README's peers table made them: one
    calibration sample (held-out reviews excluded), then prune_step with the calibrated method under a
    measured-speedup target at batch 32 x 128 (heads and neurons together, compensated), saved as a model
    folder; or the run folders given with --pruned."""
    from anatomy_prune.errors import UserError
    from anatomy_prune.evaluate.counts import count_params
    from anatomy_prune.evaluate.metrics import evaluation_set
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.models.saved import save_model
    from anatomy_prune.pipeline.requests import PruneRequest
    from anatomy_prune.pipeline.step import prune_step
    from anatomy_prune.runfolder import read_json
    from anatomy_prune.scores.calibration import make_calibration

    runs = {"dense": {"spec": args.model, "info": {"target": None}}}
    given = args.pruned or []
    if given and len(given) != len(args.targets):
        raise UserError(f"--pruned gives {len(given)} runs for {len(args.targets)} targets")
    if given:
        for s, spec in zip(args.targets, given):
            runs[f"pruned-{s:g}x"] = {"spec": spec, "info": {"target": s, "given": spec}}
        return runs
    from anatomy_prune.runfolder import RunFolder

    calib, calib_s = None, 0.0
    for s in args.targets:
        tgt = {"speedup": s} if args.target_kind == "speedup" else {"flops": 1.0 / s}
        spec = f"{args.out}-pruned/{s:g}x"  # its own run folder: kept if the benchmark stops later, reused
        settings = {"model": args.model, "target": tgt, "calib_size": args.calib_size, "split": args.split,
                    "eval_size": args.eval_size}
        with RunFolder(spec, "deploy-prune", settings, force=args.force) as prf:
            if prf.same_as_before:
                print(f"reusing {spec}", flush=True)
                runs[f"pruned-{s:g}x"] = {"spec": spec, "info": read_json(Path(spec) / "info.json", "info")}
                continue
            if calib is None:
                t0 = time.perf_counter()
                dense = load_model(args.model, device="cpu")
                if dense.kind != "classifier":
                    raise UserError(f"--model must be a fine-tuned classifier, not a {dense.kind}")
                held_out = evaluation_set(dense, "imdb", args.eval_size, args.split)
                calib = make_calibration(dense, args.calib_size, exclude=held_out.texts)
                calib_s = time.perf_counter() - t0
            res = prune_step(calib, PruneRequest(method="calibrated", target={**tgt, "batch_size": 32, "seq_len": 128}))
            save_model(res.loaded, prf.stage("model"), plan=res.plan.to_dict(), pruned={"method": "calibrated", "target": tgt})
            print(f"pruned to target {s}x: widths {res.plan.kept_widths}, heads {res.plan.kept_heads}, "
                  f"{res.prune_s:.0f} s", flush=True)
            info = {"target": s, "target_kind": args.target_kind, "prune_s": res.prune_s, "calibration_s": calib_s,
                    "params": count_params(res.loaded.model), "ffn_widths": res.plan.kept_widths,
                    "heads": res.plan.kept_heads, "cost_model": res.cost_model}
            prf.write_json("info.json", info)
            runs[f"pruned-{s:g}x"] = {"spec": spec, "info": info}
    return runs


def build_variants(args, runs: dict, rf) -> tuple[dict, dict]:
    """Every model in every engine: {(model, engine): {"call": one forward on given inputs, ...}}."""
    from anatomy_prune.export.onnx import session
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.models.quantize import quantize_int8
    from anatomy_prune.pipeline.export import ExportRequest, export

    variants, exports = {}, {}
    onnx_dir = rf.stage_dir("onnx")
    for name, run in runs.items():
        fp32 = load_model(run["spec"], device="cpu")
        int8 = copy.copy(fp32)
        int8.model = quantize_int8(copy.deepcopy(fp32.model))
        run["info"]["params"] = run["info"].get("params") or sum(p.numel() for p in fp32.model.parameters())
        for eng, loaded in (("torch-fp32", fp32), ("torch-int8", int8)):
            variants[(name, eng)] = {"kind": "torch", "loaded": loaded}
        for eng, quant in (("ort-fp32", None), ("ort-int8", "int8")):
            out = onnx_dir / f"{name}-{eng[4:]}"
            meta = export(ExportRequest(model=run["spec"], quantize=quant), out)
            exports[f"{name}/{eng}"] = {"export_s": meta["export_s"], "bytes": meta["bytes"],
                                        "quantize_s": (meta["quantization"] or {}).get("seconds"),
                                        "source_bytes": meta["source_bytes"], "check": meta["check"]}
            variants[(name, eng)] = {"kind": "ort", "session": session(out / "model.onnx", args.threads,
                                                                        spinning=False), "tokenizer": fp32.tokenizer}
    return variants, exports


def forward(v: dict, inputs: dict):
    """A no-argument call of one variant on `inputs` (torch tensors; ONNX Runtime gets the same as numpy)."""
    import torch

    if v["kind"] == "torch":
        model = v["loaded"].model

        def run():
            with torch.inference_mode():
                return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return run
    feed = {k: t.numpy() for k, t in inputs.items()}
    sess = v["session"]
    return lambda: sess.run(["logits"], feed)


# --- measurements --------------------------------------------------------------------------------

def time_variants(variants: dict, batch: int, tokens: int, repeats: int, args) -> dict:
    """All variants interleaved on the same fixed inputs; speedups against dense PyTorch float32 and,
    per engine, pruned against dense, from the same rounds."""
    from anatomy_prune.evaluate.timing import fixed_inputs, paired_speedup, time_interleaved

    vocab = variants[("dense", "torch-fp32")]["loaded"].tokenizer.vocab_size
    inputs = fixed_inputs(vocab, batch, tokens)
    fns = {f"{m}/{e}": forward(v, inputs) for (m, e), v in variants.items()}
    print(f"timing {len(fns)} variants at {batch} x {tokens}, {repeats} rounds", flush=True)
    t = time_interleaved(fns, warmup=args.warmup, repeats=repeats)
    base = t["dense/torch-fp32"]
    out = {}
    for key, tm in t.items():
        model, eng = key.split("/")
        row = {"median_s": tm.median, "q1_s": tm.q1, "q3_s": tm.q3, "times_s": tm.times_s,
               "vs_dense_torch_fp32": paired_speedup(base, tm)}
        if model != "dense":
            row["vs_dense_same_engine"] = paired_speedup(t[f"dense/{eng}"], tm)
        out[key] = row
    return out


def accuracy_of(variants: dict, args) -> dict:
    """Accuracy of every variant on the same held-out reviews (tokenised once), with a Wilson interval,
    McNemar against dense PyTorch float32, and agreement with its own model in PyTorch float32."""
    import numpy as np
    import torch

    from anatomy_prune.data.batches import batches
    from anatomy_prune.evaluate.metrics import evaluation_set
    from anatomy_prune.evaluate.stats import mcnemar, wilson
    from anatomy_prune.models.loading import max_length_for

    dense = variants[("dense", "torch-fp32")]["loaded"]
    data = evaluation_set(dense, "imdb", args.eval_size, args.split)
    enc = list(batches(dense.tokenizer, data.texts, 32, max_length_for(dense)))
    labels = np.asarray(data.labels)
    preds = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # accuracy does not depend on threads; one is cheapest on a shared machine
    for (m, e), v in variants.items():
        t0 = time.perf_counter()
        logits = []
        for b in enc:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            out = forward(v, inputs)()
            logits.append(out.float().numpy() if isinstance(out, torch.Tensor) else out[0])
        preds[(m, e)] = np.concatenate(logits) > 0
        print(f"accuracy {m}/{e}: {(preds[(m, e)] == labels).mean():.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    torch.set_num_threads(threads)
    base = preds[("dense", "torch-fp32")] == labels
    out = {"n_eval": len(labels), "split": args.split, "max_length": max_length_for(dense)}
    for (m, e), p in preds.items():
        correct = p == labels
        out[f"{m}/{e}"] = {"accuracy": float(correct.mean()), "interval": wilson(int(correct.sum()), len(correct)),
                           "vs_dense_torch_fp32": mcnemar(correct.tolist(), base.tolist()),
                           "agrees_with_own_torch_fp32": float((p == preds[(m, "torch-fp32")]).mean())}
    return out


# --- report --------------------------------------------------------------------------------------

def tables(r: dict) -> str:
    shapes = list(r["timings"])
    acc = r["accuracy"]
    m = r["machine"]
    lines = [f"{acc['n_eval']} held-out reviews ({acc['max_length']} tokens); timings interleaved, {m['threads']} "
             f"threads in both runtimes, {m['cpu']}; load {r['load_before']} -> {r['load_after']}. Speedup: dense "
             "PyTorch float32 / variant, ratio of medians [round-by-round quartiles].", "",
             "| model | engine | params M | accuracy % [95%] | vs dense (pts, McNemar p) | "
             + " | ".join(f"{s} ms | speedup {s}" for s in shapes) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(shapes)]
    for key, a in acc.items():
        if "/" not in key:
            continue
        model, eng = key.split("/")
        lo, hi = a["interval"]
        vs = a["vs_dense_torch_fp32"]
        cells = []
        for s in shapes:
            t = r["timings"][s][key]
            sp = t["vs_dense_torch_fp32"]
            cells.append(f"{1e3 * t['median_s']:.1f} | {sp['speedup']:.2f}x [{sp['paired_q1']:.2f}-{sp['paired_q3']:.2f}]")
        params = r["models"][model].get("params") or 0
        lines.append(f"| {model} | {eng} | {params / 1e6:.1f} | {100 * a['accuracy']:.1f} [{100 * lo:.1f}-{100 * hi:.1f}] | "
                     f"{100 * vs['diff']:+.1f}, p={vs['p_value']:.2g} | " + " | ".join(cells) + " |")
    lines += ["", "Pruned / dense in the same engine (speedup [quartiles]):", "",
              "| model | shape | " + " | ".join(ENGINES) + " |", "|---|---|" + "---|" * len(ENGINES)]
    for model in [k for k in r["models"] if k != "dense"]:
        for s in shapes:
            cells = [r["timings"][s][f"{model}/{e}"]["vs_dense_same_engine"] for e in ENGINES]
            lines.append(f"| {model} | {s} | " + " | ".join(f"{c['speedup']:.2f}x [{c['paired_q1']:.2f}-"
                                                           f"{c['paired_q3']:.2f}]" for c in cells) + " |")
    lines += ["", "| export | seconds | file MB | max abs logit diff vs PyTorch float32 |", "|---|---|---|---|"]
    for key, e in r["exports"].items():
        d = e["check"].get("int8") or e["check"]["float32"]
        lines.append(f"| {key} | {e['export_s'] + (e['quantize_s'] or 0):.1f} | {e['bytes'] / 1e6:.1f} | "
                     f"{d['max_abs']:.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
