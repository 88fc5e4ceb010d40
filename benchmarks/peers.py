"""Peers side by side: ours (`calibrated` under a measured-latency target, heads and FFN neurons together),
Torch-Pruning (Taylor and magnitude importance; FFN channels and heads), TextPruner (its FFN and head pruning
with its own importance scores) and Kwon et al. 2022 (benchmarks/kwon.py: Fisher mask search under a FLOPs
constraint, mask rearrangement and mask tuning, reimplemented from the paper), each also with torch's dynamic
int8 stacked on it, on the same fine-tuned model, the same calibration reviews and the same held-out reviews,
in one process. For every point: accuracy with its 95% interval, McNemar against our point of the nearest
measured speedup (an int8 point against ours + int8), parameters, pruning time and the measured speedup
(dense and pruned timed interleaved at batch 32 x 128 tokens on this CPU). Under speedup targets the latency
model is fitted once, at the first target (its pruning time includes the timing), and reused for the others.

    make peers      # builds .venv-peers (the peers, benchmarks/peer_requirements.txt), then runs:
    PYTHONPATH=src .venv-peers/bin/python benchmarks/peers.py --model runs/demo/finetune --out runs/peers

Writes --out/peers.json, --out/table.md and --out/figures/accuracy_vs_speedup.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GRID = [(0.3, 0.0), (0.5, 0.25), (0.7, 0.5), (0.85, 0.65)]     # (FFN sparsity, head sparsity) of the peers
TARGETS = [1.5, 2.0, 2.5, 3.0]                                  # our measured-speedup targets
KWON_FLOPS = [0.65, 0.5, 0.4, 0.32, 0.25, 0.2]                  # Kwon et al.'s FLOPs constraints (fractions kept)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/finetune")
    p.add_argument("--split", default="heldout")
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    p.add_argument("--target-kind", choices=("speedup", "flops"), default="speedup",
                   help="speedup: measured latency (the default); flops: keep 1/target of the FLOPs (tiny smoke runs, "
                   "where timings are all overhead)")
    p.add_argument("--grid", type=float, nargs="+", default=[x for g in GRID for x in g],
                   help="FFN and head sparsities of the peers, in pairs")
    p.add_argument("--peers", nargs="*", default=["torch-pruning-taylor", "torch-pruning-magnitude", "textpruner"],
                   help="the peers to run (none: ours only): torch-pruning-taylor, torch-pruning-magnitude, textpruner "
                   "(BERT-, RoBERTa- and MPNet-layout models), kwon and kwon-untuned (its ablation without mask tuning; "
                   "the two run only when named)")
    p.add_argument("--kwon-flops", type=float, nargs="+", default=KWON_FLOPS,
                   help="the FLOPs fractions Kwon et al.'s method keeps, one point each (with --peers kwon)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="also give every point an int8 twin, ours and the peers' (default: on)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="time each speedup target's plan against dense and correct its budget (default: on)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/peers")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from anatomy_prune.data.batches import batches
    from anatomy_prune.errors import UserError, exit_status
    from anatomy_prune.evaluate.metrics import evaluate_classifier, evaluation_set
    from anatomy_prune.evaluate.stats import mcnemar
    from anatomy_prune.evaluate.timing import load_average, machine_info
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.models.quantize import quantize_int8
    from anatomy_prune.evaluate.timing import measure_speedup
    from anatomy_prune.pipeline.requests import PruneRequest
    from anatomy_prune.pipeline.step import copy_loaded, prune_step
    from anatomy_prune.runfolder import RunFolder
    from anatomy_prune.scores.calibration import make_calibration
    import kwon
    import peer_adapters as peers

    grid = list(zip(args.grid[0::2], args.grid[1::2]))
    known = {"torch-pruning-taylor", "torch-pruning-magnitude", "textpruner", "kwon", "kwon-untuned"}

    def job():
        if set(args.peers) - known:
            raise UserError(f"--peers: unknown {sorted(set(args.peers) - known)}; choose from {sorted(known)}")
        if not all(0 < f < 1 for f in args.kwon_flops):
            raise UserError(f"--kwon-flops must be fractions in (0, 1), got {args.kwon_flops}")
        with RunFolder(args.out, "peers-benchmark", {k: v for k, v in vars(args).items() if k != "out"},
                       force=args.force) as rf, tempfile.TemporaryDirectory(prefix="peers-cost-") as tmp:
            clf = load_model(args.model, device="cpu")
            if clf.kind != "classifier":
                raise UserError(f"--model must be a fine-tuned classifier, not a {clf.kind}")
            data = evaluation_set(clf, "imdb", args.eval_size, args.split)
            calib = make_calibration(clf, args.calib_size, exclude=data.texts)
            calib_batches = [b for b in batches(clf.tokenizer, calib.texts, 16, calib.max_length, calib.labels)]

            def loss_fn(model, batch):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

            def point(name: str, loaded, seconds: float, extra: dict, float_model=None) -> dict:
                ev = evaluate_classifier(loaded, data, 64, progress=False)
                sp = measure_speedup(clf, loaded, 32, 128, repeats=args.repeats) if float_model is None else \
                    int8_speedup(clf, float_model, loaded, args.repeats)
                from anatomy_prune.evaluate.counts import count_params
                row = {"method": name, **extra, "accuracy": ev["accuracy"], "accuracy_interval": ev["accuracy_interval"],
                       "params": count_params(loaded.model), "prune_s": seconds, **sp, "correct": ev["correct"]}
                print(f"{name:28s} {extra}  acc {100 * ev['accuracy']:.2f}  speedup {sp['measured_speedup']:.2f}x  "
                      f"prune {seconds:.0f} s", flush=True)
                rows.append(row)
                rf.write_resume({"rows": rows})
                return row

            def int8_point(name: str, flt, seconds: float, extra: dict) -> None:
                """The float point's int8 twin (torch's dynamic int8), timed against dense and its float model."""
                q = copy_loaded(flt)
                t1 = time.perf_counter()
                q.model = quantize_int8(q.model)
                point(f"{name} + int8", q, seconds + time.perf_counter() - t1, extra, flt)

            rows: list[dict] = []
            dense_ev = evaluate_classifier(clf, data, 64, progress=False)
            rows.append({"method": "dense", "accuracy": dense_ev["accuracy"], "accuracy_interval": dense_ev["accuracy_interval"],
                         "measured_speedup": 1.0, "params": sum(q.numel() for q in clf.model.parameters()),
                         "prune_s": 0.0, "correct": dense_ev["correct"]})
            saved = Path(tmp) / "cost_model.json"     # the first target's latency model, reused by the others
            for s in args.targets:
                t0 = time.perf_counter()
                tgt = {"speedup": s} if args.target_kind == "speedup" else {"flops": 1.0 / s}
                reuse = args.target_kind == "speedup" and saved.is_file()
                if reuse:
                    tgt["cost_model"] = str(saved)
                if args.target_kind == "speedup":
                    tgt["check"] = args.check     # each target's plan timed against dense and corrected
                res = prune_step(calib, PruneRequest(method="calibrated", target={**tgt, "batch_size": 32, "seq_len": 128}))
                secs = time.perf_counter() - t0
                if args.target_kind == "speedup" and not reuse:
                    saved.write_text(json.dumps(res.cost_model, default=float))
                point("ours", res.loaded, secs, {"target_speedup": s, "ffn_widths": res.plan.kept_widths,
                                                 "heads": res.plan.kept_heads,
                                                 "cost_model": "reused" if reuse else "fitted",
                                                 "checked": (res.cost_model or {}).get("checked")})
                if args.int8:
                    int8_point("ours", res.loaded, secs, {"target_speedup": s})
            fisher = None                                   # Kwon's, shared by its points, each charged its seconds
            for peer in [p for p in args.peers if p.startswith("kwon")]:
                fisher = fisher or kwon.fisher_matrices(calib)
                for f in args.kwon_flops:
                    out = kwon.prune_with_kwon(clf, calib, f, fisher, tune=peer == "kwon")
                    point(peer, out["loaded"], out["seconds"], {
                        "flops": f, "ffn_widths": out["plan"].kept_widths, "heads": out["plan"].kept_heads,
                        "rearranged_units": out["rearranged_units"], "tuning_stopped_at": out["tuning"]["stopped_at"]})
                    if args.int8:
                        int8_point(peer, out["loaded"], out["seconds"], {"flops": f})
            for peer in [p for p in args.peers if not p.startswith("kwon")]:
                for ffn, heads in grid:
                    work = copy_loaded(clf)
                    if peer.startswith("torch-pruning"):
                        out = peers.prune_with_torch_pruning(work.model, calib_batches, ffn_sparsity=ffn,
                                                             head_sparsity=heads, importance=peer.split("-")[-1],
                                                             loss_fn=loss_fn)
                    else:
                        out = peers.prune_with_textpruner(work.model, calib_batches, ffn_sparsity=ffn,
                                                          head_sparsity=heads, loss_fn=loss_fn)
                    point(peer, work, out["seconds"], {"ffn_sparsity": ffn, "head_sparsity": heads,
                                                       "ffn_widths": out["ffn_widths"], "heads": out["heads_per_layer"],
                                                       "notes": out.get("notes", "")})
                    if args.int8:     # the same int8 as ours, timed the same way (issue 25, item 5)
                        int8_point(peer, work, out["seconds"], {"ffn_sparsity": ffn, "head_sparsity": heads})
            for r in rows[1:]:
                # int8 rows are compared with ours + int8, float rows with ours
                ours = [o for o in rows if o["method"] == ("ours + int8" if r["method"].endswith("int8") else "ours")]
                if r["method"] not in ("ours", "ours + int8") and ours:
                    ref = min(ours, key=lambda o: abs(o["measured_speedup"] - r["measured_speedup"]))
                    r["vs_ours"] = {**mcnemar(r["correct"], ref["correct"]), "ours_speedup": ref["measured_speedup"]}
                r["vs_dense"] = mcnemar(r["correct"], rows[0]["correct"])
            result = {"machine": machine_info(), "load": load_average(), "settings": vars(args),
                      "n_eval": len(data), "rows": [{k: v for k, v in r.items() if k != "correct"} for r in rows]}
            rf.write_json("peers.json", result)
            rf.write_text("table.md", table(result))
            figure(result, rf.stage_dir("figures"))
        print(table(result))

    return exit_status(job)


def int8_speedup(dense, flt, q, repeats: int) -> dict:
    """An int8 point timed in the same rounds as dense and its own float model (two warm-up calls each), so
    its speedup and what int8 adds over the float model come from one interleaved run (issue 25, item 4)."""
    from anatomy_prune.evaluate.timing import fixed_inputs, forward_fn, paired_speedup, time_interleaved
    from anatomy_prune.models.families import base_model

    vocab = int(base_model(dense.model).get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, 32, 128)
    t = time_interleaved({k: forward_fn(m.model, inputs) for k, m in (("dense", dense), ("float", flt), ("int8", q))},
                         warmup=2, repeats=repeats)
    sp, over = paired_speedup(t["dense"], t["int8"]), paired_speedup(t["float"], t["int8"])
    return {"measured_speedup": sp["speedup"], "speedup_paired_q1": sp["paired_q1"], "speedup_paired_q3": sp["paired_q3"],
            "speedup_shape": [32, 128], "dense_forward_s": t["dense"].median, "pruned_forward_s": t["int8"].median,
            "int8_over_float": over["speedup"], "int8_over_float_q1": over["paired_q1"],
            "int8_over_float_q3": over["paired_q3"]}


def table(result: dict) -> str:
    dense = result["rows"][0]["accuracy"]
    lines = [f"{result['n_eval']} held-out reviews; speedup measured at batch 32 x 128 tokens, interleaved with the "
             "dense model; McNemar against ours at the nearest speedup, int8 against ours + int8 (p < 0.05 = supported).", "",
             "| method | setting | speedup | accuracy % [95%] | vs dense (pts) | vs ours (pts, p) | params M | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        setting = (f"target {r['target_speedup']}x" if "target_speedup" in r else
                   f"FFN {r['ffn_sparsity']:.0%}, heads {r['head_sparsity']:.0%}" if "ffn_sparsity" in r else
                   f"FLOPs {r['flops']:.2f}" if "flops" in r else "")
        lo, hi = r["accuracy_interval"]
        vo = r.get("vs_ours")
        vs = f"{100 * vo['diff']:+.1f}, p={vo['p_value']:.2g}" if vo else ""
        lines.append(f"| {r['method']} | {setting} | {r['measured_speedup']:.2f}x | {100 * r['accuracy']:.1f} "
                     f"[{100 * lo:.1f}-{100 * hi:.1f}] | {100 * (r['accuracy'] - dense):+.1f} | {vs} | "
                     f"{r['params'] / 1e6:.1f} | {r['prune_s']:.0f} |")
    return "\n".join(lines) + "\n"


def figure(result: dict, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    for name in dict.fromkeys(r["method"] for r in rows[1:]):
        rs = sorted([r for r in rows if r["method"] == name], key=lambda r: r["measured_speedup"])
        xs, ys = [r["measured_speedup"] for r in rs], [100 * r["accuracy"] for r in rs]
        err = [[100 * (r["accuracy"] - r["accuracy_interval"][0]) for r in rs],
               [100 * (r["accuracy_interval"][1] - r["accuracy"]) for r in rs]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=name)
    ax.axhline(100 * rows[0]["accuracy"], color="black", linestyle=":", label="dense")
    ax.set_xlabel("measured speedup (batch 32 x 128 tokens, this CPU)")
    ax.set_ylabel("accuracy % (95% interval)")
    ax.set_title(f"Accuracy against measured speedup, {result['n_eval']} held-out reviews")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "accuracy_vs_speedup.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
