"""ONNX export (issue 24): a pruned tiny model of each exported family (uneven FFN widths, heads removed, one
layer with no head) runs in ONNX Runtime with PyTorch's logits, needs nothing from this package to run,
int8 is ONNX Runtime's own, and bad input is one line with exit status 2 and nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from anatomy_prune import load_model
from anatomy_prune.cli import main
from anatomy_prune.errors import UserError
from anatomy_prune.export.onnx import EXPORTABLE, FLOAT_TOL, INT8_TOL, check_exportable, session
from anatomy_prune.models.families import ffn_widths, head_counts
from anatomy_prune.models.saved import save_model
from anatomy_prune.plan import PruningPlan

from conftest import TEXTS, make_classifier

# name -> (alias, kind): every family the exporter handles, each kind it handles
CASES = {"bert": ("tiny-bert", "classifier"), "distilbert": ("tiny-distilbert", "classifier"),
         "gpt2": ("tiny-gpt2", "classifier"), "gpt2-lm": ("tiny-gpt2", "causal-lm"),
         "llama-lm": ("tiny-llama", "causal-lm")}
WIDTHS = [19, 13, 10]  # every 2nd, 3rd and 4th of 37 neurons


def _plan(model) -> PruningPlan:
    """Uneven FFN widths; layer 0 loses its last head unit, layer 1 all of them, layer 2 its first."""
    widths, units = ffn_widths(model), head_counts(model)
    keep = [list(range(0, w, layer + 2)) for layer, w in enumerate(widths)]
    heads = [list(range(units[0] - 1)), [], list(range(1, units[2]))]
    return PruningPlan(keep=keep, widths=widths, heads=heads, head_widths=units, method="given")


_RUNS: dict[str, tuple[Path, object]] = {}


def _pruned_run(tmp_path_factory, case: str) -> tuple[Path, object]:
    """A run folder of the `prune` job (a plan applied physically) and the dense model it came from; made
    once per case for the whole module."""
    if case in _RUNS:
        return _RUNS[case]
    alias, kind = CASES[case]
    tmp_path = tmp_path_factory.mktemp(case)
    if kind == "classifier":
        dense = make_classifier(alias)
        spec = str(save_model(dense, tmp_path / "dense", max_length=32))
        data = tmp_path / "reviews.csv"
        data.write_text("text,label\n" + "".join(f"\"{t} ({i})\",{i % 2}\n" for i, t in enumerate(TEXTS * 2)))
    else:
        dense, spec = load_model(alias, device="cpu"), alias
        data = tmp_path / "text.txt"
        data.write_text("\n".join(TEXTS * 12))  # perplexity needs a block of 128 tokens
    _plan(dense.model).save(tmp_path / "plan.json")
    run = tmp_path / "run"
    assert main(["prune", "--model", spec, "--plan", str(tmp_path / "plan.json"), "--mode", "physical",
                 "--data", str(data), "--eval-size", "40", "--batch-size", "8", "--out", str(run)]) == 0
    _RUNS[case] = run, dense
    return run, dense


def _batches(tokenizer) -> list[dict[str, np.ndarray]]:
    """Batches unlike the exporter's own checks: four padded reviews, and 3 x 21 seeded ids with padding."""
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    first = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    g = np.random.default_rng(0)
    ids = g.integers(5, 90, size=(3, 21)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    return [first, {"input_ids": ids, "attention_mask": mask}]


def _torch(loaded, b) -> np.ndarray:
    ids, mask = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask) if loaded.kind == "classifier" else \
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return out.numpy()


def _real(b, x: np.ndarray) -> np.ndarray:
    return x[b["attention_mask"].astype(bool)] if x.ndim == 3 else x  # an LM: real tokens only


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_pruned_model_equals_pytorch(tmp_path, tmp_path_factory, case):
    alias, kind = CASES[case]
    run, dense = _pruned_run(tmp_path_factory, case)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(run), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((out / "deploy.json").read_text())
    assert meta["kind"] == kind and meta["ffn_widths"] == WIDTHS and meta["base_model"] == alias
    units = head_counts(dense.model)
    assert meta["attn_heads"] == [units[0] - 1, 0, units[2] - 1]
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["outputs"][0]["axes"] == (["batch"] if kind == "classifier" else ["batch", "sequence", "vocab"])
    assert meta["check"]["float32"]["max_rel"] <= FLOAT_TOL and (out / "tokenizer_config.json").is_file()
    shapes = {tuple(t.dims) for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert any(10 in s for s in shapes) and any(13 in s for s in shapes)  # the pruned widths are in the graph
    pruned, sess = load_model(str(run), device="cpu"), session(out / "model.onnx", threads=2)
    for b in _batches(pruned.tokenizer):
        got, ref = sess.run(["logits"], b)[0], _torch(pruned, b)
        assert got.shape == ref.shape
        diff = np.abs(_real(b, got) - _real(b, ref))
        assert (diff <= FLOAT_TOL * (1 + np.abs(_real(b, ref)))).all(), diff.max()
        assert np.abs(_real(b, got) - _real(b, _torch(dense, b))).max() > 1e-3  # it is the pruned model


def test_runs_without_this_package_and_int8_is_onnx_runtimes(tmp_path, tmp_path_factory):
    """The README's three lines in a fresh interpreter where anatomy_prune cannot be imported; --quantize int8
    writes ONNX Runtime's integer ops, a smaller file, and logits within the stated tolerance."""
    run, _ = _pruned_run(tmp_path_factory, "gpt2")
    out, q = tmp_path / "onnx", tmp_path / "onnx-int8"
    assert main(["export", "--model", str(run), "--out", str(out)]) == 0
    assert main(["export", "--model", str(run), "--out", str(q), "--quantize", "int8"]) == 0
    code = ("import sys, json; sys.modules['anatomy_prune'] = None\n"
            "import onnxruntime, transformers\n"
            "for folder in sys.argv[2:]:\n"
            "    sess = onnxruntime.InferenceSession(folder + '/model.onnx')\n"
            "    tok = transformers.AutoTokenizer.from_pretrained(folder)\n"
            "    logits = sess.run(None, dict(tok(json.loads(sys.argv[1]), padding=True, return_tensors='np',"
            " return_token_type_ids=False)))[0]\n"
            "    print(json.dumps(logits.tolist()))")
    pruned = load_model(str(run), device="cpu")
    ref = _torch(pruned, _batches(pruned.tokenizer)[0])
    res = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS), str(out), str(q)], capture_output=True,
                         text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    for line, tol in zip(res.stdout.splitlines(), (FLOAT_TOL, INT8_TOL)):
        got = np.array(json.loads(line))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= tol * (1 + np.abs(ref).max())
    meta = json.loads((q / "deploy.json").read_text())
    ops = {n.op_type for n in onnx.load(str(q / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "MatMulInteger" not in \
        {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert meta["quantize"] == "int8" and meta["check"]["int8_within"]
    assert 0 < meta["check"]["int8"]["max_abs"] and meta["bytes"] < 0.6 * meta["float32_bytes"]


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-llama"])
def test_a_layer_without_ffn_neurons_exports_and_quantizes(tmp_path, alias):
    """A 2x target can remove every neuron of a layer: the empty MatMul stays float, the rest goes int8."""
    from anatomy_prune.data.texts import load_probes
    from anatomy_prune.export.onnx import check_batches, export_onnx, max_difference, quantize_onnx
    from anatomy_prune.models.surgery import keep_ffn_neurons

    loaded = make_classifier(alias)
    keep_ffn_neurons(loaded.model, [range(5), [], range(7)])
    path, q = tmp_path / "m.onnx", tmp_path / "q.onnx"
    export_onnx(loaded, path)
    info = quantize_onnx(path, q)
    batches = check_batches(loaded, [p["text"] for p in load_probes()], 48)
    assert max_difference(loaded, session(path), batches)["max_rel"] <= FLOAT_TOL
    diff = max_difference(loaded, session(q), batches)
    assert 0 < diff["max_abs"] and diff["max_rel_to_batch"] <= INT8_TOL and info["quantized_ops"]["MatMulInteger"] > 0


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    _fails(capsys, ["export", "--model", str(junk), "--out", str(tmp_path / "a")], "config.json")
    _fails(capsys, ["export", "--model", "tiny-bert", "--out", str(tmp_path / "b")],
           "classifier: bert, distilbert, gpt2, llama", "causal-lm: gpt2, llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    _fails(capsys, ["export", "--model", "tiny-gpt2", "--out", str(busy)], str(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["mine.txt"] and (busy / "mine.txt").read_text() == "keep me"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    _fails(capsys, ["export", "--model", "tiny-gpt2", "--out", str(tmp_path / "c")],
           'pip install "anatomy-prune[deploy]"')
    _fails(capsys, ["export", "--model", "tiny-gpt2", "--out", str(tmp_path / "d"), "--opset", "9"], "--opset")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_torch_int8_models_are_refused_with_the_way_out():
    from anatomy_prune.models.quantize import quantize_int8

    loaded = make_classifier("tiny-bert")
    check_exportable(loaded)
    loaded.model = quantize_int8(loaded.model)
    with pytest.raises(UserError, match="export with --quantize int8"):
        check_exportable(loaded)


# --- slow: every model type, the dynamo exporter, the demo model ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_every_model_type_exports(tmp_path, exporter):
    """Both kinds of every tiny model type, pruned as above; dynamo on one of each kind."""
    from anatomy_prune.apply import physical
    from anatomy_prune.data.texts import load_probes
    from anatomy_prune.export.onnx import check_batches, export_onnx, max_difference
    from anatomy_prune.models.loading import TINY_TYPES

    types = TINY_TYPES if exporter == "torchscript" else {"bert": "tiny-bert", "llama": "tiny-llama"}
    for t, alias in types.items():
        for kind in ("classifier", "causal-lm"):
            loaded = make_classifier(alias) if kind == "classifier" else load_model(alias, device="cpu")
            if loaded.kind != kind:
                continue
            assert loaded.family.name in EXPORTABLE[kind]
            loaded.model = physical(loaded.model, _plan(loaded.model))
            path = tmp_path / f"{t}-{kind}.onnx"
            export_onnx(loaded, path, exporter=exporter)
            diff = max_difference(loaded, session(path), check_batches(loaded, [p["text"] for p in load_probes()], 48))
            assert diff["max_rel"] <= FLOAT_TOL, (t, kind, diff)


DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo" / "finetune" / "model"


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_dir(), reason="needs the demo model (make demo)")
def test_demo_model_exports_float32_and_int8(tmp_path):
    """The fine-tuned demo model: float32 logits within 1e-4 of PyTorch on 64 test reviews; int8 within the
    stated tolerance, and the same decision on at least 95% of them."""
    from anatomy_prune.data.splits import eval_set

    loaded = load_model(str(DEMO), device="cpu")
    texts = eval_set("imdb", 64, "test").texts
    enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    b = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    ref = _torch(loaded, b)
    for quant, tol in ((None, FLOAT_TOL), ("int8", INT8_TOL)):
        out = tmp_path / str(quant)
        assert main(["export", "--model", str(DEMO), "--out", str(out)] + (["--quantize", quant] if quant else [])) == 0
        got = session(out / "model.onnx", threads=2).run(["logits"], b)[0]
        if quant is None:
            assert (np.abs(got - ref) <= tol * (1 + np.abs(ref))).all()
        else:
            assert np.abs(got - ref).max() <= tol * (1 + np.abs(ref).max())
            assert ((got > 0) == (ref > 0)).mean() >= 0.95
