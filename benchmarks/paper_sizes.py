"""The paper's model sizes at full size on this CPU: bert-base-uncased and gpt2 (12 layers, hidden 768,
FFN 3072; random weights from the emulated hub, real tokenizers) through anatomy -> strategy and calibrated
pruning (physical) -> save -> reload in a fresh process -> latency at batch 32 x 128 tokens. Each step's
wall time and peak resident memory are measured (a sampler thread reads /proc/self/status; the reload runs
in its own process and reports its own peak). GPT-2's Conv1D path runs at its real size.

    .venv/bin/python benchmarks/paper_sizes.py --out runs/paper-sizes            # both models
    .venv/bin/python benchmarks/paper_sizes.py --models gpt2 --calib-size 16 --repeats 1 --out /tmp/ps

Random weights: the accuracy numbers mean nothing; the times, memory and shapes do. The emulated hub is
built once under --hub (tests/emulated_hub.py) and used with HF_HUB_OFFLINE=1, so the code names the real
hub ids unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the emulated hub lives with the tests


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Peak:
    """Peak resident memory (MB) while a block runs, sampled every 0.1 s."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self.start = time.perf_counter()

        def run():
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, rss_mb())
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        self.seconds = time.perf_counter() - self.start
        return False


RELOAD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
t = time.perf_counter()
from anatomy_prune import load_model
m = load_model(sys.argv[1], device="cpu")
enc = m.tokenizer(["a short review to check the reloaded model"], return_tensors="pt")
with torch.no_grad():
    out = m.model(**enc)
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": peak, "logit": float(out.flatten()[0])}))
"""


def run_model(hub_id: str, args, out: Path) -> dict:
    import torch

    from anatomy_prune.data import calibration_set, eval_set
    from anatomy_prune.evaluate.counts import count_params, flops_per_token
    from anatomy_prune.evaluate.timing import fixed_inputs, forward_fn, paired_speedup, time_interleaved
    from anatomy_prune.models.classifier import BinaryClassifier
    from anatomy_prune.models.loaded import Loaded
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.models.saved import save_model
    from anatomy_prune.pipeline.anatomy import measure_anatomy
    from anatomy_prune.pipeline.requests import AnatomySpec, PruneRequest
    from anatomy_prune.pipeline.step import prune_step
    from anatomy_prune.scores.calibration import Calibration

    steps: dict[str, dict] = {}
    with Peak() as p:
        base = load_model(hub_id, device="cpu")
        torch.manual_seed(0)
        clf = Loaded(BinaryClassifier(base.model).eval(), base.tokenizer, "classifier", hub_id,
                     {"base_model": hub_id, "max_length": 128})
    steps["load"] = {"seconds": p.seconds, "peak_mb": p.peak}
    probes = eval_set("hf", 16)
    with Peak() as p:
        measure_anatomy(clf, probes.texts, None, out / f"{hub_id}-anatomy", AnatomySpec(max_length=128, figures=False),
                        progress=False)
    steps["anatomy"] = {"seconds": p.seconds, "peak_mb": p.peak}
    cal = calibration_set(args.calib_size, source="hf")
    calib = Calibration(clf, cal.texts, cal.labels, max_length=128, batch_size=8)
    pruned = {}
    for method in ("strategy", "calibrated"):
        with Peak() as p:
            res = prune_step(calib, PruneRequest(method=method, sparsity=0.5, mode="physical"))
        steps[f"prune {method}"] = {"seconds": p.seconds, "peak_mb": p.peak, "prune_s": res.prune_s}
        pruned[method] = res
    with Peak() as p:
        folder = save_model(pruned["calibrated"].loaded, out / f"{hub_id}-pruned", plan=pruned["calibrated"].plan.to_dict())
    steps["save"] = {"seconds": p.seconds, "peak_mb": p.peak}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(folder), str(torch.get_num_threads())], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    steps["reload (fresh process)"] = json.loads(proc.stdout.strip().splitlines()[-1])
    vocab = int(clf.model.backbone.get_input_embeddings().num_embeddings)
    inputs = fixed_inputs(vocab, args.batch_size, args.length)
    with Peak() as p:
        t = time_interleaved({"dense": forward_fn(clf.model, inputs),
                              "calibrated 50%": forward_fn(pruned["calibrated"].loaded.model, inputs)},
                             warmup=1, repeats=args.repeats)
    sp = paired_speedup(t["dense"], t["calibrated 50%"])
    steps["latency"] = {"seconds": p.seconds, "peak_mb": p.peak, "dense_s": t["dense"].median,
                        "pruned_s": t["calibrated 50%"].median, **sp}
    return {"model": hub_id, "params": count_params(clf.model),
            "pruned_params": count_params(pruned["calibrated"].loaded.model),
            "flops_per_token": flops_per_token(clf.model, args.length),
            "pruned_flops_per_token": flops_per_token(pruned["calibrated"].loaded.model, args.length), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["bert-base-uncased", "gpt2"])
    p.add_argument("--hub", default="runs/hub-emulated", help="where the emulated hub is built (about 1 GB)")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/paper-sizes")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from anatomy_prune.errors import exit_status
    from anatomy_prune.runfolder import RunFolder, check_out_path

    def job():
        check_out_path(args.out)   # before the emulated hub (about 1 GB) is built: a bad --out costs nothing
        from emulated_hub import activate, build_hub_cache

        env = build_hub_cache(Path(args.hub), models=("bert-base-uncased", "gpt2"), imdb_train=17_000,
                              imdb_test=8_000)

        class Patch:  # what emulated_hub.activate needs of pytest's monkeypatch, without the undo
            setenv = staticmethod(lambda k, v: os.environ.__setitem__(k, v))
            setattr = staticmethod(setattr)

        activate(env, Patch())     # patches huggingface_hub's and datasets' import-time constants too
        import torch

        torch.set_num_threads(args.threads)
        from anatomy_prune.evaluate.timing import load_average, machine_info

        with RunFolder(args.out, "paper-sizes", {k: v for k, v in vars(args).items() if k != "out"},
                       force=args.force) as rf:
            work = rf.scratch("work")
            result = {"machine": machine_info(), "load_before": load_average(), "rss_after_imports_mb": rss_mb(),
                      "settings": vars(args), "models": [run_model(m, args, work) for m in args.models],
                      "load_after": load_average()}
            rf.write_json("paper_sizes.json", result)
        for m in result["models"]:
            print(f"\n{m['model']}: {m['params'] / 1e6:.1f} M params -> {m['pruned_params'] / 1e6:.1f} M")
            for name, s in m["steps"].items():
                print(f"  {name:24s} {s['seconds']:7.1f} s   peak {s['peak_mb']:7.0f} MB"
                      + (f"   speedup {s['speedup']:.2f}x" if "speedup" in s else ""))

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
