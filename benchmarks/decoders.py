"""Decoders without retraining: SmolLM2-135M with 50% of its FFN neurons removed, and with 20% and 50% of its
parameters removed (FFN neurons and attention head units together), ours against magnitude and a FLAP-style
baseline (An et al. 2024: fluctuation scores, a per-layer standardised global ranking, bias compensation; and its
uniform variant, the same share of every layer) built on the same calibration statistics.

    .venv/bin/python benchmarks/decoders.py --out runs/decoders                 # the README's run
    .venv/bin/python benchmarks/decoders.py --eval-texts 8 --calib-size 8 --out runs/decoders-smoke

Every point is one pipeline.prune_step (or the layer-wise path) on one Calibration, evaluated on the same held-out
IMDB test reviews: perplexity with a 95% bootstrap interval over texts, and paired bootstrap tests against dense
and against ours at the same setting. Writes decoders.json and table.md into --out (a run folder).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anatomy_prune.apply.tune import TUNE_RIDGE, tune_outputs  # noqa: E402
from anatomy_prune.data import lm_texts  # noqa: E402
from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate import perplexity  # noqa: E402
from anatomy_prune.evaluate.counts import count_params  # noqa: E402
from anatomy_prune.evaluate.metrics import paired_perplexity  # noqa: E402
from anatomy_prune.models import load_model  # noqa: E402
from anatomy_prune.pipeline.allocation import Allocation  # noqa: E402
from anatomy_prune.pipeline.compensation import Compensation  # noqa: E402
from anatomy_prune.pipeline.iterative import compose, prune_iterative, step_sparsities  # noqa: E402
from anatomy_prune.pipeline.layerwise import prune_layerwise  # noqa: E402
from anatomy_prune.pipeline.requests import PruneRequest  # noqa: E402
from anatomy_prune.pipeline.step import PruneResult, prune_step  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402
from anatomy_prune.scores import make_calibration  # noqa: E402
from anatomy_prune.scores.calibration import calibration_pass  # noqa: E402

log = logging.getLogger("benchmarks.decoders")
FLAP = dict(allocation=Allocation(scope="global", normalize="standard"), compensation=Compensation(kind="bias"))
GOALS = {"FFN 50%": 1.6, "params -20%": 1.25}   # issue 25: perplexity at most this x dense


METHODS = ("magnitude", "FLAP-style", "FLAP-style, uniform", "ours", "ours, layer-wise", "ours, neuron path",
           "ours, leave-one-out neurons", "ours, no tuning", "ours, iterative 2", "ours, iterative 3",
           "ours, iterative 2, tuned each step", "ours, tuning ridge 0.01", "ours, tuning ridge 1")


def settings(ffns: tuple[float, ...], params: tuple[float, ...], methods: tuple[str, ...] = METHODS
             ) -> list[tuple[str, str, dict]]:
    """(setting, method label, PruneRequest keywords) of every point, for the methods asked for; "layerwise"
    marks the layer-wise path. FFN-only settings come first, then parameter targets."""
    out = []
    for ffn in ffns:
        out += [(f"FFN {ffn:.0%}", "magnitude", dict(method="magnitude", sparsity=ffn)),
                (f"FFN {ffn:.0%}", "FLAP-style", dict(method="fluctuation", sparsity=ffn, **FLAP)),
                (f"FFN {ffn:.0%}", "FLAP-style, uniform", dict(method="fluctuation", sparsity=ffn,
                                                               compensation=FLAP["compensation"],
                                                               allocation=Allocation(scope="local"))),
                (f"FFN {ffn:.0%}", "ours", dict(method="calibrated", sparsity=ffn)),
                (f"FFN {ffn:.0%}", "ours, layer-wise", dict(method="calibrated", sparsity=ffn, layerwise="sequential")),
                (f"FFN {ffn:.0%}", "ours, neuron path", dict(method="calibrated", sparsity=ffn,
                                                             params={"neuron_path": True, "tune": False})),
                (f"FFN {ffn:.0%}", "ours, no tuning", dict(method="calibrated", sparsity=ffn, params={"tune": False})),
                (f"FFN {ffn:.0%}", "ours, iterative 2", dict(method="calibrated", sparsity=ffn, iterations=2)),
                (f"FFN {ffn:.0%}", "ours, iterative 3", dict(method="calibrated", sparsity=ffn, iterations=3)),
                # variants tried for issue 25 and not kept (run_point: keys starting with _ are this script's)
                (f"FFN {ffn:.0%}", "ours, iterative 2, tuned each step", dict(method="calibrated", sparsity=ffn,
                                                                              iterations=2, _tune_each_step=True)),
                (f"FFN {ffn:.0%}", "ours, tuning ridge 0.01", dict(method="calibrated", sparsity=ffn, _tune_ridge=0.01)),
                (f"FFN {ffn:.0%}", "ours, tuning ridge 1", dict(method="calibrated", sparsity=ffn, _tune_ridge=1.0))]
    for removed in params:
        target = {"params": round(1.0 - removed, 6)}
        out += [(f"params -{removed:.0%}", "magnitude", dict(method="magnitude", target=target)),
                (f"params -{removed:.0%}", "FLAP-style", dict(method="fluctuation", target=target, **FLAP)),
                (f"params -{removed:.0%}", "ours", dict(method="calibrated", target=target)),
                (f"params -{removed:.0%}", "ours, iterative 3", dict(method="calibrated", target=target, iterations=3)),
                (f"params -{removed:.0%}", "ours, leave-one-out neurons", dict(method="calibrated", target=target,
                                                                               params={"neuron_path": False,
                                                                                       "tune": False})),
                (f"params -{removed:.0%}", "ours, no tuning", dict(method="calibrated", target=target,
                                                                   params={"tune": False}))]
    return [(setting, label, kw) for setting, label, kw in out if label in methods]


def run_point(calib, kwargs: dict):
    """The pruned model and its plan, through the one pruning step (or the layer-wise path); the variants not kept
    (keys starting with _) through the same step with the output tuning run here."""
    own = {k: kwargs[k] for k in kwargs if k.startswith("_")}
    req = PruneRequest(**{k: v for k, v in kwargs.items() if k not in own})
    if own:
        return _variant(calib, req, **own)
    if req.layerwise:
        return prune_layerwise(calib, req, progress=False)
    return prune_iterative(calib, req) if req.iterations > 1 else prune_step(calib, req)


def _variant(calib, req: PruneRequest, _tune_each_step: bool = False, _tune_ridge: float | None = None):
    """_tune_each_step: req.iterations shares, each followed by the output tuning toward the dense model (so the
    next share's statistics come from a tuned model); _tune_ridge: all at once, tuned with this ridge (the
    within-layer refit keeps the default)."""
    work, plans, seconds, res = None, [], 0.0, None
    shares = step_sparsities(req.sparsity, req.iterations) if _tune_each_step else [req.sparsity]
    for i, share in enumerate(shares):
        res = prune_step(calib.for_model(work) if i else calib, replace(req, sparsity=round(share, 9), iterations=1),
                         inplace=i > 0, tune=False)
        work, start = res.loaded, time.perf_counter()
        tune_outputs(work, calib.loaded, calib, TUNE_RIDGE if _tune_ridge is None else _tune_ridge)
        seconds += res.prune_s + time.perf_counter() - start
        plans.append(res.plan)
    return PruneResult(work, compose(plans), None, seconds, res.scores, recipe=res.recipe)


def measure(args) -> dict:
    loaded = load_model(args.model, device="cpu")
    texts = lm_texts("imdb", args.eval_texts)
    calib = make_calibration(loaded, args.calib_size, args.max_length, seed=0, exclude=texts, batch_size=8)
    start = time.perf_counter()
    calibration_pass(calib, grads=True, heads=True, progress=False)    # shared by every point
    stats_s = time.perf_counter() - start
    dense = perplexity(loaded, texts, args.max_length, batch_size=8, progress=False)
    n_dense = count_params(loaded.model)
    rows = [{"setting": "dense", "method": "dense", "params": n_dense, **_ppl(dense)}]
    print(f"dense {dense['perplexity']:.2f} ({dense['n_tokens']} tokens, {len(texts)} texts)", flush=True)
    scored: dict[tuple[str, str], dict] = {}     # (setting, method) -> its perplexity result (per-text losses)
    for setting, label, kwargs in settings(tuple(args.ffn), tuple(args.params_removed), tuple(args.methods)):
        try:
            res = run_point(calib, kwargs)
        except UserError as exc:
            print(f"{setting} {label}: {exc}", flush=True)
            continue
        p = perplexity(res.loaded, texts, args.max_length, batch_size=8, progress=False)
        n = count_params(res.loaded.model)
        row = {"setting": setting, "method": label, "params": n, "params_removed": round(1 - n / n_dense, 4),
               "ffn_removed": round(res.plan.sparsity, 4), "prune_s": round(res.prune_s, 1), **_ppl(p),
               "vs_dense": paired_perplexity(p, dense), "kept_per_layer": res.plan.kept_widths,
               "heads_per_layer": res.plan.kept_heads}
        scored[setting, label] = p
        rows.append(row)
        print(f"{setting:12s} {label:18s} ppl {p['perplexity']:9.1f} x{row['vs_dense']['ratio']:.2f} "
              f"params -{row['params_removed']:.1%} prune {row['prune_s']:.0f} s", flush=True)
        del res
    for row in rows[1:]:
        ours = scored.get((row["setting"], "ours"))
        if ours is not None and row["method"] != "ours":
            row["vs_ours"] = paired_perplexity(scored[row["setting"], row["method"]], ours)
    return {"model": args.model, "eval_texts": len(texts), "eval_tokens": dense["n_tokens"],
            "max_length": args.max_length, "calib_size": len(calib.texts), "stats_s": round(stats_s, 1),
            "dense_params": n_dense, "rows": rows}


def _ppl(p: dict) -> dict:
    return {"perplexity": p["perplexity"], "interval": p["perplexity_interval"], "n_tokens": p["n_tokens"]}


def _test(t: dict | None) -> str:
    if not t:
        return ""
    return f"{t['ratio']:.2f}x [{t['low']:.2f}-{t['high']:.2f}], p={t['p_value']:.2g}"


def table(result: dict) -> str:
    """Markdown: one row per point; x dense and vs ours are paired bootstrap ratios over the same texts."""
    lines = ["| setting | method | params removed | perplexity [95%] | x dense [95%], p | vs ours [95%], p | prune s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["interval"]
        lines.append(f"| {r['setting']} | {r['method']} | {r.get('params_removed', 0):.1%} | {r['perplexity']:.1f} "
                     f"[{lo:.1f}-{hi:.1f}] | {_test(r.get('vs_dense'))} | {_test(r.get('vs_ours'))} | "
                     f"{r.get('prune_s', '')} |")
    for setting, goal in GOALS.items():
        hit = [r for r in result["rows"] if r["setting"] == setting and r["method"].startswith("ours")]
        if hit:
            best = min(hit, key=lambda r: r["perplexity"])
            ok = best["vs_dense"]["ratio"] <= goal
            lines.append(f"\n{setting}: goal <= {goal}x dense; best of ours {best['vs_dense']['ratio']:.2f}x "
                         f"({best['method']}) -> {'met' if ok else 'not met'}")
    return "\n".join(lines)


def figure(result: dict, folder) -> str:
    """Perplexity x dense [95% paired interval] against the share removed: FFN settings (left) and parameter
    targets (right), one line per method; the issue's goals as dotted marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("FFN", "ffn_removed", "share of FFN neurons removed", (0.5, GOALS["FFN 50%"])),
              ("params", "params_removed", "share of all parameters removed", (0.2, GOALS["params -20%"])))
    for ax, (prefix, key, xlabel, goal) in zip(axes, panels):
        rows = [r for r in result["rows"][1:] if r["setting"].startswith(prefix) and r["vs_dense"]["ratio"] < 50]
        for name in dict.fromkeys(r["method"] for r in rows):
            color = f"C{METHODS.index(name)}" if name in METHODS else None   # one colour per method in both panels
            rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r[key])
            ys = [r["vs_dense"]["ratio"] for r in rs]
            err = [[y - r["vs_dense"]["low"] for y, r in zip(ys, rs)], [r["vs_dense"]["high"] - y for y, r in zip(ys, rs)]]
            ax.errorbar([r[key] for r in rs], ys, yerr=err, marker="o", capsize=2, label=name, color=color)
        ax.plot([goal[0]], [goal[1]], marker="*", markersize=12, color="black", linestyle="none",
                label=f"goal: <= {goal[1]}x at {goal[0]:.0%}")
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity / dense (95% paired interval)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} without retraining: {result['eval_texts']} held-out IMDB reviews "
                 f"({result['eval_tokens']} tokens); magnitude is off the scale", fontsize=10)
    path = folder / "perplexity_vs_removed.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ffn", type=float, nargs="*", default=[0.5],
                   help="fractions of FFN neurons removed, one setting each (default: 0.5)")
    p.add_argument("--params-removed", type=float, nargs="*", default=[0.2, 0.5],
                   help="fractions of all parameters removed, FFN and heads (default: 0.2 0.5)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"which methods to run (default: all of {', '.join(METHODS)})")
    p.add_argument("--calib-size", type=int, default=256, help="calibration reviews (default: 256)")
    p.add_argument("--eval-texts", type=int, default=100, help="held-out IMDB test reviews (default: 100)")
    p.add_argument("--max-length", type=int, default=128, help="(default: 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="write into an --out folder of another run")
    p.add_argument("--out", default="runs/decoders", help="(default: runs/decoders)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def job():
        with RunFolder(args.out, "decoders-benchmark", {**vars(args), "out": None}, force=args.force) as rf:
            result = {"benchmark": "decoders", "created": created, "settings": vars(args),
                      "load_start": os.getloadavg(), **measure(args), "load_end": os.getloadavg()}
            rf.write_json("decoders.json", result)
            rf.write_text("table.md", table(result) + "\n")
            figure(result, rf.stage_dir("figures"))
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
