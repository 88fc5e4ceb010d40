"""`make demo`: fine-tune minilm on IMDB -> evaluate on the test reviews -> anatomy on the ten probes ->
sweep of the pruning methods -> runs/demo/report.md, offline. Each step is its own run folder and reuses what
an earlier run with the same settings wrote, so a second `make demo` is quick and a killed one resumes.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .data.splits import eval_set
from .evaluate.counts import size_report
from .evaluate.metrics import evaluate_classifier
from .models.loading import load_model
from .pipeline.anatomy import anatomy_from_spec
from .pipeline.finetune import finetune
from .pipeline.report import write_report
from .pipeline.requests import AnatomyRequest, CalibSpec, EvalSpec, SweepConfig
from .pipeline.sweep import run_sweep
from .runfolder import RunFolder, now_iso, read_json
from .train.finetune import preset

log = logging.getLogger(__name__)

# The default recipe (its measured accuracy: README): 4,000 training reviews, one epoch, 128 tokens from each
# review's end, word embeddings frozen.
DEMO_FINETUNE = preset("demo")
SMOKE_FINETUNE = preset("smoke")
DEMO_SWEEP = dict(methods=("random", "magnitude", "strategy", "calibrated"), sparsities=(0.1, 0.3, 0.5, 0.7, 0.9),
                  mode="physical", calib=CalibSpec(size=256))
SMOKE_SWEEP = dict(methods=("random", "magnitude", "strategy", "calibrated"), sparsities=(0.5,), mode="physical",
                   calib=CalibSpec(size=16))


def run_demo(out: str | Path = "runs/demo", smoke: bool = False, device: str | None = None,
             force: bool = False, dtype: str | None = None) -> dict:
    """Run every step of the demo into `out`; returns the summary (also written to out/summary.json)."""
    cfg = SMOKE_FINETUNE if smoke else DEMO_FINETUNE
    sweep_cfg = dict(SMOKE_SWEEP if smoke else DEMO_SWEEP)
    with RunFolder(out, "demo", {"smoke": smoke}, force=force) as rf:
        out = rf.path
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ft = finetune(cfg, out / "finetune", device=device, dtype=dtype)
        timings["finetune_s"] = time.perf_counter() - t0
        model_spec = str(ft.model_dir)

        t0 = time.perf_counter()
        model = load_model(model_spec, device=device, dtype=dtype)
        metrics = evaluate_classifier(model, eval_set("imdb", cfg.test_size), batch_size=32, max_length=cfg.max_length)
        metrics.update(size_report(model), model=model_spec, created=now_iso())
        timings["evaluate_s"] = time.perf_counter() - t0
        log.info("demo: test accuracy %.3f on %d reviews in %.1f s (%s)", metrics["accuracy"], metrics["n_eval"],
                 metrics["latency_s"], metrics["device"])
        del model

        t0 = time.perf_counter()
        anatomy = anatomy_from_spec(AnatomyRequest(model_spec, "probes", device=device, dtype=dtype), out / "anatomy")
        timings["anatomy_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = run_sweep(SweepConfig(model=model_spec, eval=EvalSpec(size=cfg.test_size), device=device, dtype=dtype,
                                     **sweep_cfg), out / "sweep")
        timings["sweep_s"] = time.perf_counter() - t0

        summary = {"finetune": ft.metrics, "reused_finetune": ft.reused, "test": metrics,
                   "anatomy": {k: anatomy.get(k) for k in ("threshold", "neurons", "total_s")},
                   "sweep_rows": len(rows), "timings": timings, "created": now_iso()}
        rf.write_json("metrics.json", metrics)
        rf.write_json("summary.json", summary)
        rf.write_text("report.md", demo_report(out, summary))
    log.info("demo finished: report in %s", Path(out) / "report.md")
    return summary


def demo_report(run_dir: Path, summary: dict) -> str:
    """report.md: what was fine-tuned and how well, the anatomy figures, the sweep table."""
    ft, test = summary["finetune"], summary["test"]
    cfg = read_json(run_dir / "finetune" / "finetune.json")["config"]
    sweep_text = write_report(run_dir / "sweep", None, title="Pruning sweep", relative_to=run_dir)
    anatomy_figs = sorted((run_dir / "anatomy" / "figures").glob("*.png"))
    lines = [
        "# anatomy-prune demo", "",
        f"Fine-tuned `{cfg['model']}` on {cfg['train_size']} IMDB training reviews ({cfg['epochs']:g} epoch, "
        f"{cfg['max_length']} tokens from the review's {'end' if cfg['truncation'] == 'tail' else 'start'}, "
        f"lr {cfg['lr']:g}, seed {cfg['seed']}) in {ft['train_s']:.0f} s; validation accuracy "
        f"{100 * ft.get('val_accuracy', float('nan')):.1f}%.", "",
        f"Test: **{100 * test['accuracy']:.1f}%** on {test['n_eval']} held-out reviews, "
        f"{test['latency_s']:.1f} s of inference (batch {test['batch_size']}, {test['max_length']} tokens, "
        f"{test['device']}, {test['threads']} threads); {test['params'] / 1e6:.1f} M parameters.", "",
        "## Anatomy (the ten probe sentences)", "",
    ]
    lines += [f"![{f.stem}]({os.path.relpath(f, run_dir)})" for f in anatomy_figs]
    lines += ["", sweep_text.replace("# Pruning sweep", "## Pruning sweep", 1)]
    timings = summary.get("timings", {})
    lines += ["", "Step times (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"
