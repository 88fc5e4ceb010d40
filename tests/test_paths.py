"""Paths that had no test before the refactor: the smoke demo end to end, `figures` (anatomy figures
redrawn from saved files, never written into the run), `sweep --restart`, `--truncation tail`, and every
benchmark script at tiny sizes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from anatomy_prune import load_model
from anatomy_prune.cli import main

from conftest import make_classifier

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    return out


@pytest.mark.xdist_group("smoke-demo")  # the module fixture is built once, on one pytest-xdist worker
def test_smoke_demo_writes_every_step(smoke_demo):
    names = {p.name for p in smoke_demo.iterdir() if not p.name.startswith(".anatomy-prune")}
    assert names == {"finetune", "anatomy", "sweep", "metrics.json", "summary.json", "report.md"}
    summary = json.loads((smoke_demo / "summary.json").read_text())
    assert summary["sweep_rows"] >= 4 and set(summary["timings"]) == {"finetune_s", "evaluate_s", "anatomy_s", "sweep_s"}
    report = (smoke_demo / "report.md").read_text()
    assert "Paired comparisons" in report and "anatomy/figures/layer_similarity.png" in report
    assert load_model(str(smoke_demo / "finetune"), device="cpu").kind == "classifier"
    # a second run with the same settings reuses the fine-tune and leaves it untouched
    before = (smoke_demo / "finetune" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--smoke", "--out", str(smoke_demo)]) == 0
    assert (smoke_demo / "finetune" / "model" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.xdist_group("smoke-demo")  # the module fixture is built once, on one pytest-xdist worker
def test_figures_gathers_and_redraws_without_writing_into_the_run(smoke_demo, tmp_path):
    run_files = {p: p.stat().st_mtime_ns for p in smoke_demo.rglob("*") if p.is_file()}
    out = tmp_path / "figs"
    assert main(["figures", "--run", str(smoke_demo), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "demo_anatomy_layer_similarity.png" in pngs and "demo_sweep_accuracy_vs_sparsity.png" in pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    assert {p: p.stat().st_mtime_ns for p in smoke_demo.rglob("*") if p.is_file()} == run_files


def test_sweep_restart_ignores_a_stopped_sweep(tmp_path, monkeypatch, tiny_csv):
    import anatomy_prune.pipeline.sweep as sweep
    from anatomy_prune.models.saved import save_model

    clf = save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32)
    real, calls = sweep.evaluate, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, SweepConfig
    cfg = SweepConfig(model=str(clf), methods=["magnitude"], sparsities=[0.3, 0.6], mode="mask",
                      eval=EvalSpec(data=str(tiny_csv), size=24), calib=CalibSpec(size=8), figures=False)
    monkeypatch.setattr(sweep, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, tmp_path / "sw", progress=False)
    monkeypatch.setattr(sweep, "evaluate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    sweep.run_sweep(cfg, tmp_path / "sw", progress=False, resume=False)   # --restart: every point again
    assert len(calls) == 3


def test_truncation_tail_keeps_the_end_of_a_long_review(tmp_path, tiny_csv):
    assert main(["finetune", "--preset", "smoke", "--data", str(tiny_csv), "--train-size", "8", "--val-size", "2",
                 "--test-size", "2", "--max-length", "16", "--truncation", "tail", "--out", str(tmp_path / "ft")]) == 0
    loaded = load_model(str(tmp_path / "ft"), device="cpu")
    text = " ".join(f"word{i}" for i in range(200)) + " the ending was superb"
    full = loaded.tokenizer(text)["input_ids"]
    cut = loaded.tokenizer(text, truncation=True, max_length=16)["input_ids"]
    assert len(cut) == 16 and cut[-6:] == full[-6:] and cut[1:4] != full[1:4]


def test_benchmark_scripts_run_at_tiny_sizes(tmp_path, tiny_csv):
    from anatomy_prune.models.saved import save_model

    clf = str(save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32))
    assert bench("latency").main(["--quick", "--model", "tiny-bert", "--sparsities", "0.5", "--repeats", "1",
                                  "--out", str(tmp_path / "lat"), "--no-progress", "--no-figure"]) == 0
    assert json.loads((tmp_path / "lat" / "latency.json").read_text())["results"][0]["rows"]
    assert bench("calibrated").main(["--part", "all", "--model", clf, "--methods", "calibrated,magnitude+comp",
                                     "--sparsities", "0.5", "--calib-size", "8", "--eval-size", "16",
                                     "--lm-model", "tiny-llama", "--lm-methods", "calibrated", "--lm-sparsities", "0.5",
                                     "--lm-calib-size", "4", "--lm-eval-texts", "8", "--lm-max-length", "32",
                                     "--threads", "1", "--out", str(tmp_path / "cal")]) == 0
    assert bench("heldout").main(["--model", clf, "--methods", "magnitude", "--n", "16", "--calib-size", "8",
                                  "--out", str(tmp_path / "held")]) == 0
    assert (tmp_path / "held.md").read_text().count("magnitude") >= 2
    assert bench("finepruning").main(["--model", "tiny-llama", "--task", "lm", "--methods", "random,gum",
                                      "--steps", "10", "--batch-size", "2", "--max-length", "16", "--train-size", "40",
                                      "--eval-size", "8", "--analysis-size", "2", "--threads", "1", "--out", str(tmp_path / "fp")]) == 0
    assert json.loads((tmp_path / "fp" / "finepruning.json").read_text())["rows"][1]["method"] == "gum"
    assert bench("timing_noise").main(["--model", clf, "--flops", "0.9", "--repeats", "1", "2", "--measurements", "2",
                                       "--blocks", "1", "--calib-size", "8", "--length", "16", "--batch-size", "2",
                                       "--threads", "1", "--out", str(tmp_path / "tn")]) == 0
    noise = json.loads((tmp_path / "tn" / "noise.json").read_text())["rows"]
    assert [r["repeats"] for r in noise] == [1, 2] and all(len(r["speedups"]) == 2 and r["sd"] >= 0 for r in noise)


def test_decoder_benchmarks_run_at_tiny_sizes(tmp_path):
    """benchmarks/decoders.py (a kept method and the variants not kept) and benchmarks/tune_ridge.py on tiny-llama."""
    assert bench("decoders").main(["--model", "tiny-llama", "--eval-texts", "6", "--calib-size", "6", "--max-length", "24",
                                   "--ffn", "0.5", "--params-removed", "--methods", "ours",
                                   "ours, iterative 2, tuned each step", "ours, tuning ridge 0.01", "--threads", "1",
                                   "--out", str(tmp_path / "dec")]) == 0
    rows = json.loads((tmp_path / "dec" / "decoders.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "ours", "ours, iterative 2, tuned each step", "ours, tuning ridge 0.01"]
    assert all(r["ffn_removed"] == pytest.approx(0.5, abs=0.05) for r in rows[1:])
    assert bench("tune_ridge").main(["--model", "tiny-llama", "--texts", "6", "--calib-size", "6", "--max-length", "24",
                                     "--ridges", "0.01", "0.3", "--threads", "1", "--out", str(tmp_path / "tr")]) == 0
    result = json.loads((tmp_path / "tr" / "tune_ridge.json").read_text())
    assert [r["ridge"] for r in result["rows"]] == [0.01, 0.3] and result["rows"][1]["validation"]["vs_first"]



def test_encoder_variants_search_iterations_and_rearrangement_at_tiny_size(tmp_path):
    """benchmarks/encoder_variants.py --variants searched iterative-3 rearranged on a tiny classifier: the searched
    plan and the one made in 3 iterations keep the same FLOPs budget as ours, the rearranged one ours' counts; the
    search's KL divergences (a binary head's one logit read as two classes) are finite and non-negative."""
    from anatomy_prune.evaluate.cost import flops_cost
    from anatomy_prune.models.saved import save_model
    from anatomy_prune.scores.calibration import make_calibration

    clf = str(save_model(make_classifier("tiny-bert"), tmp_path / "clf", max_length=32))
    assert bench("encoder_variants").main(["--model", clf, "--eval-size", "16", "--calib-size", "8", "--flops", "0.5",
                                           "--sparsity", "--variants", "neuron-path", "searched", "iterative-3", "rearranged", "--search-steps", "3",
                                           "--threads", "1", "--out", str(tmp_path / "ev")]) == 0
    rows = json.loads((tmp_path / "ev" / "variants.json").read_text())["rows"]
    assert [r["variant"][:13] for r in rows] == ["heads: remova"] + ["as neuron-pat"] * 3
    assert rows[3]["ffn_widths"] == rows[0]["ffn_widths"] and rows[3]["heads"] == rows[0]["heads"]   # counts kept
    loaded = load_model(clf, device="cpu")
    cm = flops_cost(loaded, seq_len=128)
    for r in rows:
        assert cm.predict(r["ffn_widths"], r["heads"]) <= 0.5 * cm.dense * (1 + 1e-9)
    kl = rows[1]["search"]
    assert all(0.0 <= x < float("inf") for x in kl["kl_search"] + kl["kl_check"]) and kl["kl_search"][1] <= kl["kl_search"][0]
    assert len(kl["multipliers"]) == 2 * len(rows[1]["ffn_widths"])
    lp = bench("encoder_variants")._log_probs(loaded.model, make_calibration(loaded, 4))
    assert lp.shape == (4, 2) and torch.allclose(lp.exp().sum(-1), torch.ones(4))   # per review, not across them
    # the rearrangement sees interactions: units 0 and 2 go together, so 1 goes with 0, though its diagonal is larger
    fisher = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.5]], dtype=torch.float64)
    assert bench("encoder_variants").rearranged_keep(fisher, 1) == [2]
    assert bench("encoder_variants").rearranged_keep(torch.diag(torch.tensor([3.0, 1.0, 2.0])), 2) == [0, 2]

SCRIPTS_WITH_OUT = ["big_decoder", "calibrated", "decoder_variants", "decoders", "deploy", "encoder_variants",
                    "finepruning", "heldout", "int8_layers", "latency", "paper_sizes", "peers", "timing_noise",
                    "tune_ridge"]


@pytest.mark.parametrize("name", SCRIPTS_WITH_OUT)
def test_benchmark_scripts_refuse_a_bad_out_in_one_line(name, tmp_path, capsys):
    """Every benchmark script's bad input goes through errors.exit_status, as the CLI's does: an --out that is a
    file, or below one, is one line on stderr and exit status 2, before any model is loaded; the file is left
    as it was and nothing is created beside it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    extra = {"big_decoder": ["--smoke", "--model-dir", str(tmp_path / "model")],     # never the big model or the
             "paper_sizes": ["--hub", str(tmp_path / "hub")]}.get(name, [])         # 1 GB hub, should a check fail
    for out in (blocker, blocker / "below"):
        assert bench(name).main(["--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error: --out" in err and "choose another path" in err, err
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
