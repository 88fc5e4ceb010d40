"""Mixed precision: --dtype float32 | float16 | bfloat16 | auto. bfloat16 runs on this CPU (autocast), so the
whole path is tested here; float16 needs CUDA (tested where a GPU is present)."""
from __future__ import annotations

import logging

import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.anatomy.measures import compute_anatomy
from anatomy_prune.evaluate.metrics import evaluate_classifier
from anatomy_prune.models.loaded import resolve_dtype
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.scores.calibration import Calibration, ffn_input_stats

from conftest import TEXTS, make_classifier


def test_dtype_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == "float32" and resolve_dtype(None, cpu) == "float32"
    assert resolve_dtype("auto", cuda) == "float16"          # a T4 has fast float16, no fast bfloat16
    assert resolve_dtype("bfloat16", cpu) == "bfloat16"
    with pytest.raises(UserError, match="choose one of"):
        resolve_dtype("float8", cpu)


def test_float16_on_a_cpu_falls_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("float16", torch.device("cpu")) == "float32"
    assert "needs a CUDA GPU" in caplog.text


def test_bfloat16_forward_is_close_to_float32_and_statistics_stay_float32():
    clf = make_classifier("tiny-bert")
    data = __import__("anatomy_prune.data", fromlist=["TextSet"]).TextSet(TEXTS * 4, [1, 0, 1, 0] * 4)
    r32 = evaluate_classifier(clf, data, 8, 32, progress=False)
    clf.dtype = "bfloat16"
    r16 = evaluate_classifier(clf, data, 8, 32, progress=False)
    assert r16["dtype"] == "bfloat16" and r32["dtype"] == "float32"
    assert abs(r16["roc_auc"] - r32["roc_auc"]) < 0.5
    res = compute_anatomy(clf, TEXTS, max_length=32, progress=False)
    assert all(s.dtype == torch.float32 for s in res["sims"])
    calib = Calibration(clf, TEXTS * 2, [1, 0, 1, 0] * 2, max_length=32, batch_size=4)
    stats = ffn_input_stats(calib, grads=True, progress=False)
    assert stats.gram[0].dtype == torch.float64 and stats.fisher[0].dtype == torch.float64
    assert all(torch.isfinite(f).all() for f in stats.fisher) and float(sum(f.sum() for f in stats.fisher)) > 0


def test_bfloat16_outputs_differ_from_float32_so_autocast_is_really_on():
    clf = make_classifier("tiny-llama")
    enc = clf.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = clf.model(**enc)
        clf.dtype = "bfloat16"
        with clf.autocast():
            b = clf.model(**enc)
    assert not torch.equal(a, b.float()) and torch.allclose(a, b.float(), atol=0.1)


def test_calibrated_pruning_in_bfloat16(tmp_path):
    clf = make_classifier("tiny-gpt2")
    clf.dtype = "bfloat16"
    calib = Calibration(clf, TEXTS * 2, [1, 0, 1, 0] * 2, max_length=32, batch_size=4)
    res = prune_step(calib, PruneRequest(method="calibrated", sparsity=0.5))
    assert res.compensation["mean_rel_err_compensated"] < res.compensation["mean_rel_err_removed"]


def test_finetune_in_bfloat16_on_cpu(tmp_path, tiny_csv):
    from anatomy_prune.pipeline.finetune import finetune
    from anatomy_prune.train.finetune import preset

    cfg = preset("smoke", data=str(tiny_csv), train_size=8, val_size=2, test_size=2, max_length=32, batch_size=4)
    r = finetune(cfg, tmp_path / "ft", progress=False, dtype="bfloat16")
    assert r.metrics["steps"] == 2 and r.metrics["final_loss"] == r.metrics["final_loss"]  # finite, not NaN
    assert (tmp_path / "ft" / "model").is_dir()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float16_on_cuda():  # pragma: no cover - runs where a GPU is present
    loaded = load_model("tiny-bert", device="cuda", dtype="auto")
    assert loaded.dtype == "float16"
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt").to("cuda")
    with torch.no_grad(), loaded.autocast():
        out = loaded.model(**enc).last_hidden_state
    assert out.dtype == torch.float16
