"""Sweeps on Ray (pipeline.executors): the same results as in-process, failed points reported, a killed driver
resumed, an unreachable cluster refused at once, and the packaged Figure 5a grid end to end.

One local Ray instance (2 CPUs, its temp dir under pytest's) serves the module; it is shut down at the end.
Tests that need no Ray instance (missing Ray, bad options, an unreachable address) run without one."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from anatomy_prune.cli import main
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import CalibSpec, EvalSpec, SweepConfig
from anatomy_prune.pipeline.sweep import run_sweep

from conftest import TEXTS, make_classifier

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray instance, on one pytest-xdist worker

CALIB = ["Not bad at all.", "The worst film of the year, by far and away.", "Meh.",
         "A quiet, tender story; I loved every minute of it.", "Two hours of noise and nothing else."]
SAME = ("method", "sparsity", "target_sparsity", "achieved_sparsity", "seed", "label", "accuracy",
        "accuracy_interval", "correct", "vs_dense", "neurons_removed", "neurons_removed_per_layer", "params",
        "flops_per_token", "plan", "compensated")


def _csv(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((f"{TEXTS[i % 4]} (review {i})", i % 2) for i in range(n))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT classifier folder, 24 labelled reviews, a 120-review file and 5 calibration texts."""
    d = tmp_path_factory.mktemp("files")
    (d / "calib.txt").write_text("\n".join(CALIB))
    return SimpleNamespace(clf=save_model(make_classifier("tiny-bert"), d / "clf", max_length=32),
                           csv=_csv(d / "reviews.csv", 24), big=_csv(d / "many.csv", 120), calib=d / "calib.txt")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance with 2 CPUs for this module; yields its address; shut down in the finalizer."""
    ray = pytest.importorskip("ray")
    import logging
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _cfg(files, **extra) -> SweepConfig:
    opts = {"figures": False, "mode": "mask", **extra}
    return SweepConfig(model=str(files.clf), eval=EvalSpec(data=str(files.csv), size=24),
                       calib=CalibSpec(data=str(files.calib)), **opts)


def _plans(out: Path) -> dict:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k in ("keep", "widths", "method")}
            for p in sorted((out / "plans").iterdir())}


def _argv(files, out, *extra):
    return ["sweep", "--model", str(files.clf), "--out", str(out), "--data", str(files.csv), "--calib-data",
            str(files.calib), "--eval-size", "24", *extra]


# --- no Ray instance needed ----------------------------------------------------------------------------

def test_without_ray_the_executor_is_one_line(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    out = tmp_path / "out"
    assert main(_argv(files, out, "--executor", "ray", "--methods", "magnitude", "--sparsities", "0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "anatomy-prune[cluster]"' in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["--address", "127.0.0.1:6379"], "only for --executor ray"),
    (["--executor", "ray", "--num-cpus-per-task", "0"], "--num-cpus-per-task must be > 0"),
    (["--executor", "ray", "--num-gpus-per-task", "-1"], "--num-gpus-per-task must be >= 0"),
    (["--executor", "ray", "--address", "nohost"], "is not HOST:PORT"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster reachable there"),
])
def test_bad_executor_options_fail_fast_and_write_nothing(files, tmp_path, capsys, args, msg):
    if "--executor" in args:
        pytest.importorskip("ray")
    out = tmp_path / "out"
    start = time.perf_counter()
    assert main(_argv(files, out, "--methods", "magnitude", "--sparsities", "0.5", *args)) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert not out.exists() and time.perf_counter() - start < 10


# --- on the module's Ray instance ------------------------------------------------------------------------

def test_a_killed_driver_resumes_without_redoing_finished_points(files, ray_local, tmp_path):
    """A driver on this module's Ray instance (--address) is killed after its first finished point; the rerun
    with the same settings computes only the points that are missing. (First of the Ray tests: this
    process has no Ray workers yet, so the killed driver's worker takes none of their places.)"""
    out = tmp_path / "sw"
    argv = ["sweep", "--model", str(files.clf), "--out", str(out), "--data", str(files.big), "--calib-data",
            str(files.calib), "--eval-size", "120", "--batch-size", "8", "--methods", "random,magnitude",
            "--sparsities", "0.2,0.4,0.6,0.8", "--seeds", "1", "--executor", "ray"]
    resume = out / ".anatomy-prune-resume.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "driver.log"
    with log.open("wb") as err:  # one worker (2 CPUs per point): the points finish one at a time
        proc = subprocess.Popen([sys.executable, "-m", "anatomy_prune", *argv, "--num-cpus-per-task", "2",
                                 "--address", ray_local], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a first point took over 120 s with a benchmark beside the suite
        while not resume.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None and resume.is_file(), log.read_text()[-2000:] or "no point finished in 600 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver (the cluster then ends its job's worker)
        proc.wait(timeout=30)
    assert not (out / "results.json").exists()
    finished = len(json.loads(resume.read_text())["data"]["points"])
    assert 1 <= finished < 8
    assert main([*argv, "--address", ray_local]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["resumed_after"] == finished and summary["computed"] == 8 - finished
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense"] + ["random"] * 4 + ["magnitude"] * 4
    assert not resume.exists() and len(list((out / "plans").iterdir())) == 8


def test_ray_gives_the_results_of_the_local_executor(files, ray_local, tmp_path):
    local = run_sweep(_cfg(files, methods=["random", "strategy"], sparsities=[0.3, 0.6], seeds=1),
                      tmp_path / "local", progress=False)
    remote = run_sweep(_cfg(files, methods=["random", "strategy"], sparsities=[0.3, 0.6], seeds=1, executor="ray"),
                       tmp_path / "ray", progress=False)
    assert [(r["method"], r["sparsity"]) for r in remote] == [
        ("dense", 0.0), ("random", 0.3), ("random", 0.6), ("strategy", 0.3), ("strategy", 0.6)]
    for a, b in zip(local, remote):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
        # a worker's torch threads (1) differ from this process's (2): statistics may differ in the last bits
        pa, pb = a["plan_params"], b["plan_params"]
        assert pa.keys() == pb.keys()
        assert all(pa[k] == pytest.approx(pb[k], rel=1e-6) if isinstance(pa[k], float) else pa[k] == pb[k] for k in pa)
    assert _plans(tmp_path / "local") == _plans(tmp_path / "ray") and len(_plans(tmp_path / "ray")) == 4
    assert json.loads((tmp_path / "local" / "results.json").read_text())[1]["accuracy"] == remote[1]["accuracy"]
    summary = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert summary["executor"]["kind"] == "ray" and 1 <= summary["executor"]["workers"] <= 2
    assert summary["failed"] == [] and summary["computed"] == 4 and summary["calib_stats_s"]
    assert all(r["prune_s"] > 0 for r in remote[1:])  # statistics charged as a standalone run pays them


def test_a_failing_point_is_reported_and_the_others_kept(files, ray_local, tmp_path, capsys, caplog):
    """--focus 9 is valid input but outside a 3-block model: it fails inside the worker, at run time."""
    out = tmp_path / "out"
    assert main(_argv(files, out, "--executor", "ray", "--methods", "magnitude,strategy", "--sparsities", "0.3,0.6",
                      "--focus", "9")) == 0
    printed = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], "error" in r) for r in printed] == [
        ("dense", False), ("magnitude", False), ("magnitude", False), ("strategy", True), ("strategy", True)]
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "magnitude", "magnitude"]
    failed = json.loads((out / "sweep.json").read_text())["failed"]
    assert [(f["point"], f["method"], f["sparsity"], f["params"]) for f in failed] == [
        (2, "strategy", 0.3, {"focus": [9]}), (3, "strategy", 0.6, {"focus": [9]})]
    assert all("outside the model's blocks" in f["error"] for f in failed)
    warned = [r.getMessage() for r in caplog.records if "failed (method strategy" in r.getMessage()]
    assert len(warned) == 2 and all(len(w.splitlines()) == 1 and '"focus": [9]' in w for w in warned)
    # every point failing: exit 2, one line, nothing written
    capsys.readouterr()
    none = tmp_path / "none"
    assert main(_argv(files, none, "--executor", "ray", "--methods", "strategy", "--sparsities", "0.3",
                      "--focus", "9")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anatomy-prune")]
    assert len(err) == 1 and "every point of the sweep failed" in err[0] and not none.exists()


def test_figure5a_config_runs_on_ray(files, ray_local, tmp_path):
    kw = dict(methods=[], sparsities=[], config="paper_figure5a.toml")
    rows = run_sweep(_cfg(files, executor="ray", **{**kw, "figures": True}), tmp_path / "ray", progress=False)
    config_rows = rows[1:]
    assert len(config_rows) == 5 and all(r["method"] == "strategy" and r["label"] for r in config_rows)
    assert [r["plan_params"]["alpha"] for r in config_rows] == [0.01, 0.025, 0.05, 0.05, 0.05]
    assert (tmp_path / "ray" / "figures" / "accuracy_vs_sparsity.png").stat().st_size > 1000
    local = run_sweep(_cfg(files, **kw), tmp_path / "local", progress=False)
    assert [r["accuracy"] for r in local] == [r["accuracy"] for r in rows]
    assert _plans(tmp_path / "local") == _plans(tmp_path / "ray")
