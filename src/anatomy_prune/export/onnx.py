"""ONNX export: a pruned classifier (its readout inside the graph) or a causal LM's forward (no KV cache) as
one `.onnx` file, with dynamic batch and sequence axes, that ONNX Runtime runs with no custom loader: each
layer's FFN width and head count are in its weights' shapes. int8 is ONNX Runtime's dynamic quantization.

The graph is traced by torch's exporter (`torchscript`, the default: seconds per model; or `dynamo`, which
needs onnxscript and takes far longer) on a padded example batch, so the padding path is in the graph; every
export is then checked against PyTorch on padded and unpadded batches of other sizes (`max_difference`).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.families import base_model, family_of
from ..models.loaded import Loaded

log = logging.getLogger(__name__)

INSTALL = 'pip install "anatomy-prune[deploy]"'
EXPORTERS = ("torchscript", "dynamo")
OPSET = 17
# (kind, family) pairs the exporter handles: tests/test_export.py checks each family on a pruned tiny model
# (uneven widths, heads removed, a layer with none) and, marked slow, all 14 model types
EXPORTABLE = {"classifier": ("bert", "distilbert", "gpt2", "llama"), "causal-lm": ("gpt2", "llama")}
FLOAT_TOL = 1e-4   # |onnx - torch| <= FLOAT_TOL * (1 + |torch|), float32
INT8_TOL = 0.15    # int8: |onnx - torch| <= INT8_TOL * (1 + max |torch| of the batch), dynamic int8 weights; the
                   # demo model reached 0.100 on 64 test reviews at 128 tokens (tests/test_export.py, slow)
INPUTS = ("input_ids", "attention_mask")


def require_runtime() -> tuple:
    """onnx and onnxruntime, or a one-line UserError that says what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"export needs the [deploy] extra ({exc.name} is not installed): {INSTALL}") from None
    return onnx, onnxruntime


def exportable_text() -> str:
    return "; ".join(f"{kind}: {', '.join(fams)}" for kind, fams in EXPORTABLE.items())


def check_exportable(loaded: Loaded) -> None:
    """A one-line UserError for a model the exporter cannot handle, naming the ones it can."""
    fam = family_of(loaded.model).name
    if loaded.kind not in EXPORTABLE:
        raise UserError(f"'{loaded.spec}' is a {loaded.kind} (no classification head, no LM head); export works "
                        f"for {exportable_text()}: fine-tune it first (anatomy-prune finetune)")
    if fam not in EXPORTABLE[loaded.kind]:
        raise UserError(f"a {fam}-family {loaded.kind} cannot be exported yet; export works for {exportable_text()}")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in loaded.model.modules()):
        raise UserError(f"'{loaded.spec}' holds torch's int8 layers (saved with --quantize int8), which do not "
                        "export; prune it without --quantize and export with --quantize int8 (ONNX Runtime's int8)")


class Forward(nn.Module):
    """What the graph computes: a classifier's logit per input ([batch]) or an LM's logits ([batch, pos, vocab])."""

    def __init__(self, loaded: Loaded):
        super().__init__()
        self.model, self.kind = loaded.model, loaded.kind

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.kind == "classifier":
            return self.model(input_ids=input_ids, attention_mask=attention_mask)  # [batch]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def io_spec(loaded: Loaded) -> dict:
    """Names, dtypes and axes of the graph's inputs and outputs, and how to read the output."""
    ins = [{"name": n, "dtype": "int64", "axes": ["batch", "sequence"]} for n in INPUTS]
    if loaded.kind == "classifier":
        fam = family_of(loaded.model)
        token = ("position 0 (the CLS token)" if fam.readout == "cls"
                 else "the last position whose attention_mask is 1 (left or right padding)")
        out = {"name": "logits", "dtype": "float32", "axes": ["batch"]}
        readout = {"token": fam.readout, "rule": f"the final hidden state at {token} -> dense -> one logit",
                   "output": "sigmoid(logits) is the probability of label 1 (positive, for IMDB reviews)"}
    else:
        out = {"name": "logits", "dtype": "float32", "axes": ["batch", "sequence", "vocab"]}
        readout = {"token": "every", "rule": "next-token logits at every position (no KV cache: pass the whole "
                   "sequence each step)", "output": "softmax(logits[:, t]) is the distribution of token t + 1"}
    return {"inputs": ins, "outputs": [out], "readout": readout}


def _example(loaded: Loaded) -> tuple[Tensor, Tensor]:
    """A padded example batch for tracing: 2 rows of 8 tokens, the second with 3 padding positions."""
    vocab = int(base_model(loaded.model).get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (2, 8), generator=g)  # [2, 8]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def export_onnx(loaded: Loaded, path: str | Path, *, exporter: str = "torchscript", opset: int = OPSET) -> float:
    """Write the model's forward (see Forward) to `path` as ONNX; returns the seconds it took."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    model = Forward(loaded).eval()
    args = _example(loaded)
    out_axes = {0: "batch"} if loaded.kind == "classifier" else {0: "batch", 1: "sequence"}
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notes; the outputs are checked instead
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
            torch.onnx.export(model, args, str(path), input_names=list(INPUTS), output_names=["logits"],
                              dynamic_axes={**axes, "logits": out_axes}, opset_version=opset, dynamo=False)
        else:
            _export_dynamo(model, args, path, opset)
    return time.perf_counter() - t0


def _export_dynamo(model: nn.Module, args: tuple, path: str | Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(f"--exporter dynamo needs onnxscript: {INSTALL}") from None
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in INPUTS}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(model, args, str(path), input_names=list(INPUTS), output_names=["logits"],
                      dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True, external_data=False,
                      verbose=False)


def quantize_onnx(src: str | Path, dst: str | Path) -> dict:
    """ONNX Runtime's dynamic int8 quantization (weights int8 per channel, in a 7-bit range so that CPUs
    without VNNI do not saturate; activations quantized per call); returns its settings, the quantized ops
    it wrote and the seconds it took."""
    onnx, _ = require_runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    t0 = time.perf_counter()
    empty = _empty_weight_nodes(onnx.load(str(src), load_external_data=False))
    try:
        root.setLevel(logging.ERROR)  # its advice to pre-process is printed through the root logger
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_exclude=empty)
    finally:
        root.setLevel(level)
    seconds = time.perf_counter() - t0
    ops: dict[str, int] = {}
    for node in onnx.load(str(dst), load_external_data=False).graph.node:
        if "Integer" in node.op_type or "Quantize" in node.op_type:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True,
            "reduce_range": True, "quantized_ops": ops, "seconds": seconds}


def _empty_weight_nodes(model) -> list[str]:
    """Nodes that multiply by an empty weight (a layer whose FFN neurons were all removed): the quantizer
    cannot scale an empty tensor, and there is nothing to quantize."""
    empty = {t.name for t in model.graph.initializer if 0 in t.dims}
    return [n.name for n in model.graph.node if n.name and empty.intersection(n.input)]


def session(path: str | Path, threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session (all graph optimisations); threads 0 = ONNX Runtime's own choice.
    spinning=False: idle worker threads sleep at once (fair when other engines are timed in between)."""
    _, ort = require_runtime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_batches(loaded: Loaded, texts: Sequence[str], max_length: int) -> list[dict[str, np.ndarray]]:
    """Tokenised batches that differ from the traced example: all texts padded together, the first alone
    (no padding) and three of different lengths; int64 arrays [batch, pos]."""
    tok = loaded.tokenizer
    groups = [list(texts), list(texts[:1]), list(texts[1:4])]
    out = []
    for g in groups:
        enc = tok(g, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out.append({n: enc[n].astype(np.int64) for n in INPUTS})
    return out


def torch_logits(loaded: Loaded, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        ids, mask = (torch.from_numpy(batch[n]).to(loaded.device) for n in INPUTS)
        return Forward(loaded)(ids, mask).float().cpu().numpy()


def max_difference(loaded: Loaded, sess, batches: Sequence[dict[str, np.ndarray]]) -> dict:
    """The largest |onnx - torch| over the batches (real tokens only for an LM), absolute and relative to
    1 + |torch| (of the element for float32 checks, of the batch's largest logit for int8 checks)."""
    worst_abs, worst_rel, worst_batch_rel = 0.0, 0.0, 0.0
    for b in batches:
        ref = torch_logits(loaded, b)
        got = sess.run(["logits"], b)[0]
        if got.shape != ref.shape:
            raise UserError(f"the exported graph returns logits of shape {got.shape}, PyTorch {ref.shape}")
        diff = np.abs(got - ref)
        if ref.ndim == 3:  # [batch, pos, vocab]: positions the mask marks as real
            keep = b["attention_mask"].astype(bool)
            diff, ref = diff[keep], ref[keep]
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / (1 + np.abs(ref))).max()))
        worst_batch_rel = max(worst_batch_rel, float(diff.max() / (1 + np.abs(ref).max())))
    return {"max_abs": worst_abs, "max_rel": worst_rel, "max_rel_to_batch": worst_batch_rel}
