"""Big decoder, layer by layer, in bounded memory: prune a TinyLlama-1.1B-shaped model block by block on a CPU,
sampling resident memory and timing every block, and the CPU's throughputs in that run (from which
docs/big_model_projection.md projects 7B and 70B: not here, this file measures only).

    .venv/bin/python benchmarks/big_decoder.py --threads 2          # build the model once, then measure (README)
    .venv/bin/python benchmarks/big_decoder.py --smoke --model-dir runs/big_decoder_smoke_model --out runs/big_decoder_smoke
    .venv/bin/python benchmarks/big_decoder.py --from-json runs/big_decoder/big_decoder.json --out runs/big_decoder-redraw

The model (built once, in a separate process, into --model-dir, a run folder outside git): a Llama shaped like
TinyLlama-1.1B (22 blocks, hidden 2048, FFN 5632, 32 heads, 4 key/value heads, untied LM head) with random
weights in bfloat16, saved as safetensors shards with GPT-2's BPE tokenizer (anatomy_prune.resources). The
vocabulary is the tokenizer's 50257, not TinyLlama's 32000 (GPT-2 token ids go up to 50256), so it has
1.17B parameters instead of 1.10B; everything below is computed from the model as built.

The measurement (this process): RSS after imports and after reading the calibration texts (the fixed
overhead), then `load_model(dir, weights_dtype="bfloat16")`, `pipeline.layerwise.prune_layerwise` (the
calibrated recipe without Fisher, 50%, sequential) on IMDB reviews of 128 tokens, a forward pass of the pruned
model, and a sharded save; a thread samples VmRSS from /proc/self/status every --interval seconds. Writes into
--out (anatomy_prune.runfolder.RunFolder): big_decoder.json (peak RSS, weights' size, the ratio, time per
block and per stage, totals, load averages, and the measured throughputs: forward FLOP/s and float64
linear-algebra FLOP/s), figures/memory_and_blocks.png/.pdf, and model/ (the pruned model, in shards).
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(layers=22, hidden=2048, ffn=5632, heads=32, kv_heads=4)   # TinyLlama-1.1B
SMOKE = dict(layers=4, hidden=256, ffn=704, heads=8, kv_heads=2)         # --smoke: the script in a minute
GiB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """VmRSS every `interval` seconds, with named marks (phases, block ends) on the same clock."""

    def __init__(self, interval: float, t0: float):
        super().__init__(daemon=True)
        self.interval, self.t0 = interval, t0
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss_bytes()))
            self._halt.wait(self.interval)

    def mark(self, name: str) -> None:
        self.samples.append((time.perf_counter() - self.t0, rss_bytes()))
        self.marks.append((time.perf_counter() - self.t0, name))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter() - self.t0, rss_bytes()))


# --- the model, built once ---------------------------------------------------------------------------

def build(model_dir: Path, force: bool = False, shape: dict = SHAPE) -> None:
    """The TinyLlama-shaped bf16 model with random weights, as a safetensors folder (model_dir/model)."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from anatomy_prune.resources import gpt2_tokenizer_dir
    from anatomy_prune.runfolder import RunFolder

    settings = dict(shape, dtype="bfloat16", tokenizer="gpt2-bpe", seed=0, tie_word_embeddings=False)
    with RunFolder(model_dir, "big-decoder-model", settings, force=force, what="--model-dir") as rf:
        if rf.same_as_before and rf.existing("model"):
            print(f"reusing {model_dir / 'model'}")
            return
        tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()), trust_remote_code=False)
        tok.pad_token = tok.eos_token
        tok.model_max_length = 2048
        eos = tok.eos_token_id
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                          num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, rms_norm_eps=1e-5,
                          rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
                          pad_token_id=eos)
        torch.manual_seed(0)
        start = time.perf_counter()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg).eval()                 # initialised in bf16: no float32 copy
        finally:
            torch.set_default_dtype(torch.float32)
        folder = rf.stage_dir("model")
        model.save_pretrained(folder, max_shard_size="1GB")
        tok.save_pretrained(folder)
        n = sum(p.numel() for p in model.parameters())
        rf.write_json("build.json", {"params": n, "config": cfg.to_dict(), "seconds": time.perf_counter() - start})
        print(f"built {n / 1e9:.3f}B parameters into {model_dir / 'model'} in {time.perf_counter() - start:.0f} s")


# --- FLOP counts of the measured model (its throughputs) ----------------------------------------------

def block_flops_per_token(s: dict, seq: int, ff: float | None = None) -> float:
    """Forward FLOPs per token of one block: 2 x (q, k, v, o, gate, up, down weights) + attention 4 x seq x d."""
    head = s["d"] // s["heads"]
    ff = s["ff"] if ff is None else ff
    weights = s["d"] * s["d"] * 2 + 2 * s["d"] * s["kv"] * head + 3 * s["d"] * ff
    return 2 * weights + 4 * seq * s["d"]


def la_flops(s: dict, sparsity: float) -> float:
    """float64 linear algebra per block: potrf + potri of the d_ff covariance (d_ff^3), the compensation's
    Cholesky and solve (K^3/3 + 2 K^2 R) and its error terms (about 3.5 d_model d_ff^2)."""
    ff, k = s["ff"], s["ff"] * (1 - sparsity)
    return ff ** 3 + k ** 3 / 3 + 2 * k * k * (ff - k) + 3.5 * s["d"] * ff * ff


# --- the measurement -------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    t_start = time.perf_counter()
    rss_start = rss_bytes()
    import torch
    import transformers  # noqa: F401
    from scipy.linalg import lapack  # noqa: F401  (the layer-wise scoring's in-place inverse)
    from transformers import LlamaForCausalLM  # noqa: F401

    from anatomy_prune.data.splits import calibration_set
    from anatomy_prune.evaluate.timing import load_average, machine_info
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.models.saved import save_model
    from anatomy_prune.pipeline.layerwise import prune_layerwise
    from anatomy_prune.pipeline.requests import PruneRequest
    from anatomy_prune.runfolder import RunFolder
    from anatomy_prune.scores.calibration import Calibration

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_imports = rss_bytes()
    texts = calibration_set(args.calib_size, args.seed, "imdb").texts
    gc.collect()
    overhead = rss_bytes()
    settings = dict(model=str(args.model_dir / "model"), sparsity=args.sparsity, calib_size=args.calib_size,
                    calib_max_length=args.calib_max_length, batch_size=args.batch_size, seed=args.seed,
                    threads=torch.get_num_threads(), sequential=not args.dense, shard=args.shard_size,
                    interval=args.interval)
    sampler = Sampler(args.interval, t_start)
    sampler.start()
    out: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(["benchmarks/big_decoder.py", *argv]), "settings": settings,
                 "machine": machine_info(), "load_before": load_average()}
    with RunFolder(args.out, "big-decoder-benchmark", settings, force=args.force) as rf:
        sampler.mark("load")
        t = time.perf_counter()
        loaded = load_model(settings["model"], device="cpu", weights_dtype="bfloat16")
        load_s = time.perf_counter() - t
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) + \
            sum(b.numel() * b.element_size() for b in loaded.model.buffers())
        n_params = sum(p.numel() for p in loaded.model.parameters())
        files = sum(f.stat().st_size for f in Path(settings["model"]).glob("*.safetensors"))
        c = loaded.config  # the dense shape, for the FLOP counts
        s = dict(layers=c.num_hidden_layers, d=c.hidden_size, ff=c.intermediate_size, heads=c.num_attention_heads,
                 kv=c.num_key_value_heads, vocab=c.vocab_size)
        sampler.mark("calibrate")
        calib = Calibration(loaded, texts, max_length=args.calib_max_length, batch_size=args.batch_size,
                            seed=args.seed)
        block_marks: list[dict] = []

        def on_block(entry: dict) -> None:
            sampler.mark(f"block {entry['layer']}")
            block_marks.append({"layer": entry["layer"], "t": time.perf_counter() - t_start, "rss": rss_bytes()})
            print(f"block {entry['layer']:>2}: {entry['seconds']:6.1f} s, RSS {rss_bytes() / GiB:.2f} GiB, "
                  f"peak so far {max(r for _t, r in sampler.samples) / GiB:.2f} GiB, FFN error "
                  f"{entry['rel_err_removed']:.3f} -> {entry['rel_err_compensated']:.3f}, block error "
                  f"{entry['block_rel_err']:.4f}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

        req = PruneRequest(method="calibrated", sparsity=args.sparsity, layerwise="dense" if args.dense else "sequential")
        res = prune_layerwise(calib, req, inplace=True, progress=not args.no_progress, on_block=on_block)
        sampler.mark("check")
        enc = loaded.tokenizer(texts[:2], return_tensors="pt", padding=True, truncation=True,
                               max_length=args.calib_max_length)
        with torch.no_grad():
            logits = loaded.model(**enc).logits
        finite = bool(torch.isfinite(logits).all())
        pruned_weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        del logits
        sampler.mark("save")
        t = time.perf_counter()
        if not args.no_save:
            save_model(loaded, rf.stage("model"), plan=res.plan.to_dict(), max_shard_size=args.shard_size,
                       pruned={"method": "calibrated", "layerwise": res.compensation["layerwise"],
                               "sparsity": res.plan.sparsity})
        save_s = time.perf_counter() - t
        sampler.mark("end")
        sampler.stop()
        samples = sampler.samples
        peak = max(r for _t, r in samples)
        blocks = res.compensation["blocks"]
        tokens = res.compensation["n_tokens"]
        seconds = [b["seconds"] for b in blocks]
        stage = {k: sum(b["stage_s"][k] for b in blocks) for k in blocks[0]["stage_s"]}
        fwd = block_flops_per_token(s, args.calib_max_length) * tokens
        fwd_pruned = block_flops_per_token(s, args.calib_max_length, s["ff"] * (1 - args.sparsity)) * tokens
        gram_f = 2 * tokens * (s["ff"] + 1) ** 2
        measured = {
            "cpu_forward_flops": len(blocks) * (fwd + gram_f + fwd_pruned) / (stage["stats"] + stage["slice_and_run"]),
            "cpu_fp64_flops": len(blocks) * la_flops(s, args.sparsity) / (stage["score"] + stage["compensate"])}
        out.update({
            "params": n_params, "weights_bytes": weights, "weights_gib": weights / GiB, "files_bytes": files,
            "pruned_weights_bytes": pruned_weights, "rss_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports,
            "overhead_bytes": overhead, "overhead_note": "RSS after imports and reading the calibration texts, "
            "before loading the model", "peak_rss_bytes": peak, "peak_rss_gib": peak / GiB,
            "ratio_peak_minus_overhead_to_weights": (peak - overhead) / weights,
            "target": "peak RSS <= 1.3 x weights + overhead",
            "target_bytes": 1.3 * weights + overhead, "meets_target": peak <= 1.3 * weights + overhead,
            "load_s": load_s, "layerwise_s": res.prune_s, "save_s": save_s,
            "total_s": time.perf_counter() - t_start, "tokens": tokens, "n_blocks": len(blocks),
            "block_s": seconds, "block_s_mean": sum(seconds) / len(seconds),
            "block_s_cv": (sum((x - sum(seconds) / len(seconds)) ** 2 for x in seconds) / len(seconds)) ** 0.5
            / (sum(seconds) / len(seconds)),
            "stage_s_total": stage, "blocks": blocks, "block_marks": block_marks, "marks": sampler.marks,
            "rss_samples": samples, "finite_outputs": finite, "shape": s, "sparsity": res.plan.sparsity,
            "kept_widths": res.plan.kept_widths, "measured_throughput": measured,
            "load_after": load_average()})
        rf.write_json("big_decoder.json", out)
        if not args.no_figure:
            figure(out, rf.stage_dir("figures"))
    return out


def figure(out: dict, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
    t = [s[0] for s in out["rss_samples"]]
    r = [s[1] / GiB for s in out["rss_samples"]]
    ax.plot(t, r, lw=1, color="C0", label="resident memory (VmRSS)")
    w, o = out["weights_bytes"] / GiB, out["overhead_bytes"] / GiB
    ax.axhline(o, color="grey", ls=":", lw=1, label=f"overhead {o:.2f} GiB (imports, texts)")
    ax.axhline(w + o, color="C2", ls="--", lw=1, label=f"weights {w:.2f} GiB + overhead")
    ax.axhline(1.3 * w + o, color="C3", ls="--", lw=1, label="target 1.3 x weights + overhead")
    for tm, name in out["marks"]:
        if not name.startswith("block"):
            ax.axvline(tm, color="k", lw=0.5, alpha=0.4)
            ax.text(tm, 0.02, name, fontsize=7, rotation=90, va="bottom", transform=ax.get_xaxis_transform())
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.set_title(f"Layer-wise pruning of a {out['params'] / 1e9:.2f}B-parameter bf16 Llama at "
                 f"{out['settings']['sparsity']:.0%}: peak {out['peak_rss_gib']:.2f} GiB", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    blocks = out["blocks"]
    bottom = [0.0] * len(blocks)
    for i, k in enumerate(blocks[0]["stage_s"]):
        vals = [b["stage_s"][k] for b in blocks]
        bx.bar([b["layer"] for b in blocks], vals, bottom=bottom, color=f"C{i}", label=k)
        bottom = [x + y for x, y in zip(bottom, vals)]
    bx.set_xlabel("block")
    bx.set_xticks([b["layer"] for b in blocks])
    bx.set_ylabel("seconds")
    bx.set_ylim(0, max(bottom) * 1.3)
    bx.legend(fontsize=7, ncol=6, loc="upper center", frameon=False)
    bx.set_title(f"time per block (mean {out['block_s_mean']:.1f} s, CV {out['block_s_cv']:.2f}); "
                 f"load average before / after {out['load_before']} / {out['load_after']}", fontsize=9)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"memory_and_blocks.{ext}", dpi=130)
    plt.close(fig)


def summary(out: dict) -> str:
    lines = [f"model: {out['params'] / 1e9:.3f}B parameters, weights {out['weights_gib']:.3f} GiB (bf16); "
             f"{out['n_blocks']} blocks, {out['tokens']} calibration tokens",
             f"overhead (RSS after imports and texts, before loading): {out['overhead_bytes'] / GiB:.3f} GiB "
             f"(after imports only: {out['rss_after_imports_bytes'] / GiB:.3f} GiB)",
             f"peak RSS: {out['peak_rss_gib']:.3f} GiB; (peak - overhead) / weights = "
             f"{out['ratio_peak_minus_overhead_to_weights']:.3f} (target <= 1.3: "
             f"{'met' if out['meets_target'] else 'NOT met'})",
             f"time: load {out['load_s']:.0f} s, layer-wise {out['layerwise_s']:.0f} s "
             f"({out['block_s_mean']:.1f} s per block, CV {out['block_s_cv']:.2f}, min {min(out['block_s']):.1f}, "
             f"max {max(out['block_s']):.1f}), save {out['save_s']:.0f} s, total {out['total_s']:.0f} s",
             "stages (s, all blocks): " + ", ".join(f"{k} {v:.0f}" for k, v in out["stage_s_total"].items()),
             f"measured: CPU forward {out['measured_throughput']['cpu_forward_flops'] / 1e9:.0f} GFLOP/s (bf16 "
             f"matmuls + float32 Gram), float64 linear algebra {out['measured_throughput']['cpu_fp64_flops'] / 1e9:.0f}"
             f" GFLOP/s; load average before / after {out['load_before']} / {out['load_after']}",
             "(projections to 7B / 70B from these throughputs: docs/big_model_projection.md)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("runs/big_decoder_model"),
                   help="where the model is built once (default: runs/big_decoder_model)")
    p.add_argument("--out", default="runs/big_decoder", help="run folder (default: runs/big_decoder)")
    p.add_argument("--force", action="store_true", help="write into an --out folder of another run")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib-size", type=int, default=32, help="calibration reviews (default: 32)")
    p.add_argument("--calib-max-length", type=int, default=128, help="tokens per review (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dense", action="store_true", help="dense inputs instead of sequential")
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling interval in seconds (default: 0.2)")
    p.add_argument("--shard-size", default="500MB", help="shards of the saved pruned model (default: 500MB)")
    p.add_argument("--no-save", action="store_true", help="do not save the pruned model")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--build-only", action="store_true", help="build the model and stop (run in a subprocess)")
    p.add_argument("--smoke", action="store_true", help="a small model of the same architecture (4 blocks, "
                   "hidden 256, FFN 704) in --model-dir, to check this script in a minute")
    p.add_argument("--from-json", default=None, metavar="FILE", help="measure nothing: redraw and reprint")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from anatomy_prune.errors import UserError, exit_status
    from anatomy_prune.runfolder import RunFolder, check_out_path, read_json

    def job():
        if args.build_only:
            build(args.model_dir, shape=SMOKE if args.smoke else SHAPE)
            return 0
        check_out_path(args.out)   # before the model is built: a bad --out costs nothing
        if args.from_json:
            out = read_json(args.from_json)
            out.pop("projections", None)  # older files carried projections; they live in docs/ now
            out["redrawn_from"] = str(args.from_json)
            with RunFolder(args.out, "big-decoder-redraw", {"from": str(args.from_json)}, force=args.force) as rf:
                figure(out, rf.stage_dir("figures"))
                rf.write_json("big_decoder.json", out)  # the same measurements
            print(summary(out))
            return 0
        if not (args.model_dir / "model" / "config.json").is_file():  # built in another process: RSS stays clean
            check_out_path(args.model_dir, "--model-dir")
            built = subprocess.run([sys.executable, __file__, "--build-only", "--model-dir", str(args.model_dir)]
                                   + (["--smoke"] if args.smoke else []))
            if built.returncode:
                raise UserError(f"building the model into --model-dir '{args.model_dir}' failed (its error is "
                                "above); fix that and run again")
        out = measure(args, argv)
        print(summary(out))
        print(f"wrote {Path(args.out) / 'big_decoder.json'}")

    return exit_status(job)


if __name__ == "__main__":
    sys.exit(main())
