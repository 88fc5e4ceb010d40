import json

import pytest
import torch

from anatomy_prune import load_model
from anatomy_prune.apply import mask, physical
from anatomy_prune.cli import main
from anatomy_prune.data import calibration_set
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, PruneRequest, SweepConfig
from anatomy_prune.pipeline.report import write_report
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.plan import PruningPlan
from anatomy_prune.scores import SCORERS
from anatomy_prune.scores.calibration import Calibration

from conftest import TEXTS, make_classifier

CALIB = ["Not bad at all.", "The worst film of the year, by far and away.", "Meh.",
         "A quiet, tender story; I loved every minute of it.", "Two hours of noise and nothing else."]


@pytest.fixture
def clf_dir(tmp_path):
    """A tiny BERT classifier saved as a model folder (what a fine-tune writes)."""
    loaded = make_classifier("tiny-bert")
    return save_model(loaded, tmp_path / "clf", max_length=32)


@pytest.fixture
def calib_txt(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(CALIB))
    return path


def _fast(data_csv, calib_txt, *extra):
    return ["--data", str(data_csv), "--calib-data", str(calib_txt), "--eval-size", "24", "--batch-size", "8", *extra]


def _logits(loaded, texts=TEXTS):
    enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_prune_end_to_end_and_reload(tmp_path, clf_dir, tiny_csv, calib_txt, mode, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(clf_dir), "--method", "strategy", "--sparsity", "0.5", "--mode", mode,
            "--out", str(out), *_fast(tiny_csv, calib_txt)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "strategy" and printed["neurons_removed"] == round(0.5 * 111)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "latency_s", "n_eval", "neurons_removed", "neurons_removed_per_layer", "params",
                "flops_per_token", "sparsity", "method", "mode", "prune_s", "peak_mem_mb"):
        assert key in metrics, key
    assert metrics["n_eval"] == 24 and metrics["mode"] == mode and metrics["peak_mem_mb"] > 0
    assert sum(metrics["neurons_removed_per_layer"]) == metrics["neurons_removed"]
    assert metrics["plan_params"]["alpha"] > 0 and 0 < metrics["prune_s"] < 60
    plan = PruningPlan.load(out / "plan.json")
    assert plan.method == "strategy" and plan.base_model == "tiny-bert"
    # the folder is a model spec; it gives the logits of the original with the plan applied
    again = load_model(str(out), device="cpu")
    assert again.info["plan"]["keep"] == plan.to_dict()["keep"]
    reference = load_model(str(clf_dir), device="cpu")
    (physical if mode == "physical" else mask)(reference.model, plan)
    torch.testing.assert_close(_logits(again), _logits(reference), rtol=1e-5, atol=1e-6)
    if mode == "physical":
        assert metrics["params"] < json.loads(json.dumps(sum(p.numel() for p in load_model(
            str(clf_dir), device="cpu").model.parameters())))
    # and every command takes it: evaluate, and prune again by its plan file
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_csv)]) == 0


def test_prune_causal_lm_reports_perplexity(tmp_path, calib_txt):
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(TEXTS * 12))
    out = tmp_path / "lm"
    assert main(["prune", "--model", "tiny-gpt2", "--method", "magnitude", "--sparsity", "0.3", "--mode", "physical",
                 "--out", str(out), "--data", str(text), "--calib-data", str(calib_txt), "--eval-size", "40"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity"] > 1 and "accuracy" not in metrics and metrics["n_eval"] == 40
    assert metrics["neurons_removed_per_layer"] == [11, 11, 11]
    lm = load_model(str(out), device="cpu")
    assert lm.kind == "causal-lm" and lm.info["ffn_widths"] == [26, 26, 26]


def test_apply_a_plan_file(tmp_path, clf_dir, tiny_csv, calib_txt):
    first = tmp_path / "first"
    assert main(["prune", "--model", str(clf_dir), "--method", "random", "--sparsity", "0.3", "--out", str(first),
                 *_fast(tiny_csv, calib_txt)]) == 0
    second = tmp_path / "second"
    assert main(["prune", "--model", str(clf_dir), "--plan", str(first / "plan.json"), "--mode", "physical",
                 "--out", str(second), *_fast(tiny_csv, calib_txt)]) == 0
    a = json.loads((first / "metrics.json").read_text())
    b = json.loads((second / "metrics.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["neurons_removed"] == b["neurons_removed"]
    assert b["params"] < a["params"]  # mask keeps the shapes, physical removes the neurons


@pytest.mark.parametrize("args,msg", [
    (["--method", "magnitude", "--sparsity", "1.0"], "[0, 1)"),
    (["--method", "magnitude", "--sparsity", "-0.2"], "[0, 1)"),
    (["--method", "nope", "--sparsity", "0.5"], "random, strategy"),
    (["--method", "magnitude"], "--sparsity"),
    (["--method", "magnitude", "--sparsity", "0.5", "--alpha", "0.1"], "no parameter"),
    (["--method", "magnitude", "--sparsity", "0.5", "--mode", "zero"], "mask, physical"),
    (["--plan", "WRONG_PLAN"], "does not fit"),
    (["--method", "strategy", "--alpha", "0.1", "--focus", "9"], "outside"),
    (["--method", "magnitude", "--sparsity", "0.5", "--allocation", "global", "--floor", "2"], "floor"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, clf_dir, tiny_csv, calib_txt, capsys, args, msg):
    wrong = tmp_path / "wrong.json"
    PruningPlan(keep=[[0]] * 2, widths=[37, 37]).save(wrong)
    args = [str(wrong) if a == "WRONG_PLAN" else a for a in args]
    out = tmp_path / "out"
    assert main(["prune", "--model", str(clf_dir), *args, "--out", str(out), *_fast(tiny_csv, calib_txt)]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "clf", "reviews.csv", "wrong.json"]


def test_out_folder_rules_and_force(tmp_path, clf_dir, tiny_csv, calib_txt, capsys):
    """Another run's folder is refused unless --force; a foreign non-empty folder too; '.' never."""
    out = tmp_path / "out"
    head = ["prune", "--model", str(clf_dir), "--method", "magnitude"]
    base = [*head, "--out", str(out), *_fast(tiny_csv, calib_txt)]
    assert main([*base, "--sparsity", "0.3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["neurons_removed"] == 3 * 11
    assert {p.name for p in out.iterdir() if not p.name.startswith(".anatomy-prune")} == {
        "plan.json", "model", "metrics.json"}
    capsys.readouterr()
    assert main([*base, "--sparsity", "0.5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["neurons_removed"] == 3 * 11  # untouched
    assert main([*base, "--sparsity", "0.5", "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["neurons_removed"] == 3 * 18
    assert load_model(str(out), device="cpu").info["ffn_widths"] == [37] * 3  # mask mode: shapes kept
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([*head, "--out", str(foreign), "--sparsity", "0.3", *_fast(tiny_csv, calib_txt)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    for bad in (".", ".."):
        assert main([*head, "--sparsity", "0.3", "--out", bad, *_fast(tiny_csv, calib_txt)]) == 2
        assert "current or a parent folder" in capsys.readouterr().err


def test_compensate_option(tmp_path, clf_dir, tiny_csv, calib_txt):
    """--compensate keeps the plan, refits the kept neurons' down projection (the saved weights differ from
    plain removal's) and reports the reconstruction error it removed on the calibration tokens."""
    runs = {}
    for name, extra in (("comp", ["--compensate"]), ("plain", [])):
        out = tmp_path / name
        assert main(["prune", "--model", str(clf_dir), "--method", "magnitude", "--sparsity", "0.5", *extra,
                     "--mode", "physical", "--out", str(out), *_fast(tiny_csv, calib_txt)]) == 0
        runs[name] = (json.loads((out / "metrics.json").read_text()), load_model(str(out), device="cpu"))
    (comp, comp_model), (plain, plain_model) = runs["comp"], runs["plain"]
    assert comp["compensated"] is True and plain["compensated"] is False and plain["compensation"] is None
    assert comp["neurons_removed_per_layer"] == plain["neurons_removed_per_layer"]
    report = comp["compensation"]
    assert 0 <= report["mean_rel_err_compensated"] < report["mean_rel_err_removed"]
    down = [n for n, _ in comp_model.model.named_parameters() if "output.dense.weight" in n and "attention" not in n]
    weights = dict(comp_model.model.named_parameters()), dict(plain_model.model.named_parameters())
    assert down and all(weights[0][n].shape == weights[1][n].shape for n in down)
    assert any(not torch.equal(weights[0][n], weights[1][n]) for n in down)


def test_imdb_calibration_is_pinned_training_reviews():
    from anatomy_prune.data import eval_set
    test = eval_set("imdb", 1000)
    a = calibration_set(16, seed=0, exclude=test.texts[:10])
    assert a.texts == calibration_set(16, seed=0).texts  # the test reviews are never in the training split
    assert a.texts != calibration_set(16, seed=1).texts
    assert not set(a.texts) & set(test.texts) and set(a.labels) <= {0, 1}


def test_sweep_two_methods_two_sparsities(tmp_path, clf_dir, tiny_csv, calib_txt, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(clf_dir), "--methods", "random,strategy", "--sparsities", "0,0.3,0.6",
                 "--seeds", "1", "--out", str(out), "--report", str(tmp_path / "report.md"),
                 *_fast(tiny_csv, calib_txt)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("random", 0.3), ("random", 0.6), ("strategy", 0.3), ("strategy", 0.6)]
    for r in rows:
        for key in ("mode", "accuracy", "latency_s", "n_eval", "neurons_removed", "params", "flops_per_token",
                    "prune_s", "neurons_removed_per_layer"):
            assert key in r, key
        assert r["n_eval"] == 24 and r["mode"] == "mask"
    assert rows[3]["neurons_removed"] == round(0.3 * 111) and rows[3]["plan_params"]["alpha"] > 0
    assert rows[1]["prune_s"] > 0 and rows[3]["prune_s"] > 0  # shared statistics charged to every point
    for fig in ("accuracy_vs_sparsity", "latency_vs_sparsity", "neurons_per_layer"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert len(list((out / "plans").glob("*.json"))) == 4
    # the sweep's point equals a standalone prune of the same method and sparsity
    single = tmp_path / "single"
    assert main(["prune", "--model", str(clf_dir), "--method", "strategy", "--sparsity", "0.6", "--out", str(single),
                 *_fast(tiny_csv, calib_txt)]) == 0
    assert json.loads((single / "plan.json").read_text())["keep"] == json.loads(
        (out / rows[4]["plan"]).read_text())["keep"]
    report = (tmp_path / "report.md").read_text()
    assert "| strategy | 0.60 |" in report and "sweep/figures/accuracy_vs_sparsity.png" in report


def test_sweep_physical_and_config(tmp_path, clf_dir, tiny_csv, calib_txt):
    out = tmp_path / "fig5a"
    assert main(["sweep", "--model", str(clf_dir), "--methods", "magnitude", "--sparsities", "0.5", "--mode",
                 "physical", "--config", "paper_figure5a.toml", "--out", str(out),
                 *_fast(tiny_csv, calib_txt)]) == 0
    rows = json.loads((out / "results.json").read_text())
    config_rows = [r for r in rows if r["label"]]
    assert len(config_rows) == 5 and all(r["method"] == "strategy" for r in config_rows)  # the BERT rows only
    assert [r["plan_params"]["alpha"] for r in config_rows] == [0.01, 0.025, 0.05, 0.05, 0.05]
    assert rows[1]["params"] < rows[0]["params"]  # physical: smaller model; the dense one restored for the next
    assert all(r["params"] <= rows[0]["params"] for r in rows)
    (tmp_path / "r").mkdir()
    path = write_report(out, tmp_path / "r" / "report.md")
    assert "alpha=0.05, beta=0.01" in path.read_text()
    text = write_report(out, None, relative_to=tmp_path)   # as text, links relative to a folder
    assert text == path.read_text().replace("../fig5a/", "fig5a/")


def test_sweep_bad_input_writes_nothing(tmp_path, clf_dir, tiny_csv, calib_txt, capsys):
    out = tmp_path / "out"
    for args, msg in ((["--methods", "random,nope"], "choose one of"),
                      (["--sparsities", "0.1,x"], "--sparsities: expected a comma-separated list"),
                      (["--sparsities", "0.1,1.5"], "[0, 1)"),
                      (["--config", "no_such.toml"], "not a file and not a packaged config")):
        assert main(["sweep", "--model", str(clf_dir), *args, "--out", str(out), *_fast(tiny_csv, calib_txt)]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_every_point_prunes_a_copy():
    """What ffn_snapshot / ffn_restore did by hand is now the step's guarantee: the dense model a sweep
    holds is never pruned, in either mode, and each point's model is its own copy."""
    loaded = make_classifier("tiny-gpt2")
    before = _logits(loaded)
    cal = Calibration(loaded, [], seed=0)
    plan = PruningPlan(keep=[[0, 1]] * 3, widths=[37] * 3)
    masked_ = prune_step(cal, PruneRequest(plan=plan, mode="mask"))
    removed = prune_step(cal, PruneRequest(plan=plan, mode="physical"))
    torch.testing.assert_close(_logits(loaded), before)                      # the dense model as it was
    assert not torch.allclose(_logits(masked_.loaded), before)
    torch.testing.assert_close(_logits(removed.loaded), _logits(masked_.loaded), rtol=1e-5, atol=1e-6)
    assert masked_.loaded.model is not removed.loaded.model is not loaded.model
    mask(loaded.model, plan)                                                 # by hand, in place: it does change
    torch.testing.assert_close(_logits(loaded), _logits(masked_.loaded))


def test_sweep_compensates_every_point_in_mask_mode(tmp_path, clf_dir, tiny_csv):
    out = tmp_path / "comp"
    second = "calibrated"
    assert second in SCORERS
    assert main(["sweep", "--model", str(clf_dir), "--methods", f"magnitude,{second},magnitude", "--sparsities",
                 "0.5", "--compensate", "--calib-size", "16", "--calib-max-length", "32", "--out", str(out),
                 "--data", str(tiny_csv), "--eval-size", "24"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "magnitude", second, "magnitude"]
    assert all(r["compensated"] for r in rows[1:]) and not rows[0]["compensated"]
    # the model is restored between points: the same point twice gives the same result
    assert rows[1]["accuracy"] == rows[3]["accuracy"] and rows[1]["compensation"] == rows[3]["compensation"]


def test_stopped_sweep_resumes(tmp_path, clf_dir, tiny_csv, calib_txt, monkeypatch):
    import anatomy_prune.pipeline.sweep as sweep
    real, calls = sweep.evaluate, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # dense, one point, then the machine goes away
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sweep, "evaluate", flaky)
    out = tmp_path / "sw"
    resume = out / ".anatomy-prune-resume.json"
    cfg = SweepConfig(model=str(clf_dir), methods=["magnitude", "random"], sparsities=[0.5], seeds=1, mode="mask",
                      eval=EvalSpec(data=str(tiny_csv), size=24), calib=CalibSpec(data=str(calib_txt)), figures=False)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, out, progress=False)
    # the resume data lives inside the run folder; no output, no staging and no lock are left
    assert resume.is_file() and {p.name for p in out.iterdir()} == {".anatomy-prune.json", resume.name}
    assert json.loads((out / ".anatomy-prune.json").read_text())["status"] == "incomplete"
    first = json.loads(resume.read_text())["data"]["rows"]
    assert [r["method"] for r in first] == ["dense", "magnitude"]
    rows = sweep.run_sweep(cfg, out, progress=False)
    assert len(calls) == 4  # only the missing point was evaluated again
    assert rows[:2] == first and [r["method"] for r in rows] == ["dense", "magnitude", "random"]
    assert not resume.exists()
    assert json.loads((out / "sweep.json").read_text())["resumed_after"] == 1
    assert sorted(p.name for p in (out / "plans").iterdir()) == ["00-magnitude.json", "01-random.json"]
    # --restart (resume=False) evaluates every point again
    counted = []
    monkeypatch.setattr(sweep, "evaluate", lambda *a, **k: counted.append(1) or real(*a, **k))
    sweep.run_sweep(cfg, out, progress=False, resume=False)
    assert len(counted) == 3


def test_random_runs_over_seeds_with_intervals_and_paired_tests(tmp_path, clf_dir, tiny_csv, calib_txt):
    """A stochastic method repeats over --seeds; every row has an interval and McNemar against dense;
    aggregate.json gives mean, std and each seed; predictions.json keeps per-review correctness."""
    out = tmp_path / "seeded"
    assert main(["sweep", "--model", str(clf_dir), "--methods", "random,magnitude", "--sparsities", "0.5",
                 "--seeds", "3", "--out", str(out), *_fast(tiny_csv, calib_txt)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("dense", None), ("random", 0), ("random", 1),
                                                         ("random", 2), ("magnitude", None)]
    plans = [json.loads((out / r["plan"]).read_text())["keep"] for r in rows[1:4]]
    assert plans[0] != plans[1] != plans[2]  # the seeds draw different neurons
    for r in rows:
        lo, hi = r["accuracy_interval"]
        assert lo <= r["accuracy"] <= hi and 0 < hi - lo < 1
    for r in rows[1:]:
        v = r["vs_dense"]
        assert 0 <= v["p_value"] <= 1 and v["n"] == 24
        assert v["diff"] == pytest.approx(r["accuracy"] - rows[0]["accuracy"], abs=1e-6)
    agg = {(a["method"], a["target_sparsity"]): a for a in json.loads((out / "aggregate.json").read_text())}
    assert agg[("random", 0.5)]["n_seeds"] == 3
    assert agg[("random", 0.5)]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows[1:4]) / 3)
    pred = json.loads((out / "predictions.json").read_text())["rows"]
    assert len(pred) == 5 and all(len(p) == 24 for p in pred)
    assert sum(pred[1]) / 24 == pytest.approx(rows[1]["accuracy"], abs=1e-6)
    assert main(["sweep", "--model", str(clf_dir), "--methods", "random", "--sparsities", "0.5", "--seeds", "0",
                 "--out", str(tmp_path / "zero"), *_fast(tiny_csv, calib_txt)]) == 2
    assert not (tmp_path / "zero").exists()
