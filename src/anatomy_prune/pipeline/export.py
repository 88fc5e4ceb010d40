"""`anatomy-prune export`: a model (a pruned run folder, any model spec) -> an ONNX folder for ONNX Runtime.

The output folder DIR (written through runfolder.RunFolder: refused if it holds other files, nothing
half-written) holds
  model.onnx     the graph (float32, or ONNX Runtime's dynamic int8 with --quantize int8)
  tokenizer files, as transformers' save_pretrained writes them (AutoTokenizer.from_pretrained(DIR))
  deploy.json    inputs and outputs (names, dtypes, axes), the readout rule, the base model, per-layer widths
                 and heads, file size, export time and the measured difference from PyTorch
Nothing from anatomy-prune is needed to run it: onnxruntime and a tokenizer are enough.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.texts import load_probes
from ..errors import UserError
from ..evaluate.counts import count_params
from ..export.onnx import (EXPORTERS, FLOAT_TOL, INT8_TOL, OPSET, check_batches, check_exportable, export_onnx,
                           io_spec, max_difference, quantize_onnx, require_runtime, session)
from ..models.families import ffn_widths, head_counts
from ..models.loading import load_model, max_length_for
from ..runfolder import RunFolder, now_iso

log = logging.getLogger(__name__)
FORMATS = ("onnx",)
META = "deploy.json"


@dataclass(frozen=True)
class ExportRequest:
    """What to export and how; validated once, here."""

    model: str
    format: str = "onnx"
    quantize: str | None = None      # None | "int8" (ONNX Runtime's dynamic quantization)
    exporter: str = "torchscript"    # torchscript | dynamo (torch.onnx.export's two paths)
    opset: int = OPSET

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("--model is empty; give a run folder (e.g. runs/prune-2x), a model folder or an alias")
        if self.format not in FORMATS:
            raise UserError(f"unknown --format '{self.format}'; choose one of: {', '.join(FORMATS)}")
        if self.quantize not in (None, "int8"):
            raise UserError(f"unknown --quantize '{self.quantize}'; choose int8 (or leave it out)")
        if self.exporter not in EXPORTERS:
            raise UserError(f"unknown --exporter '{self.exporter}'; choose one of: {', '.join(EXPORTERS)}")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 14 <= self.opset <= 20:
            raise UserError(f"--opset must be a whole number in [14, 20], got {self.opset!r}")


def export(req: ExportRequest, out: str | Path, *, force: bool = False) -> dict:
    """Export `req.model` into the folder `out`; returns what deploy.json records."""
    check_runtime_for(req)
    onnx, ort = require_runtime()
    import torch

    with RunFolder(out, "export", asdict(req), force=force) as rf:
        loaded = load_model(req.model, device="cpu", dtype="float32")
        check_exportable(loaded)
        work = rf.scratch("export")
        fp32 = work / "model.onnx" if req.quantize else rf.stage("model.onnx")
        log.info("exporting %s (%s, %s) with the %s exporter", req.model, loaded.kind, loaded.family.name, req.exporter)
        export_s = export_onnx(loaded, fp32, exporter=req.exporter, opset=req.opset)
        onnx.checker.check_model(str(fp32))
        max_length = max_length_for(loaded, None, fallback=128)
        batches = check_batches(loaded, [p["text"] for p in load_probes()], max_length)
        float_diff = max_difference(loaded, session(fp32), batches)
        if float_diff["max_rel"] > FLOAT_TOL:
            raise UserError(f"the exported graph differs from PyTorch by {float_diff['max_abs']:.2g} (more than "
                            f"{FLOAT_TOL:g} x (1 + |logit|)); try --exporter dynamo, and report it")
        check = {"texts": "the ten probe sentences (data/probes.json)", "shapes": [list(b["input_ids"].shape)
                 for b in batches], "float32": float_diff, "float32_tolerance": f"{FLOAT_TOL:g} x (1 + |logit|)"}
        quant = None
        if req.quantize:
            quant = quantize_onnx(fp32, rf.stage("model.onnx"))
            check["int8"] = max_difference(loaded, session(rf.stage("model.onnx")), batches)
            check["int8_tolerance"] = f"{INT8_TOL:g} x (1 + the batch's largest |logit|)"
            check["int8_within"] = check["int8"]["max_rel_to_batch"] <= INT8_TOL
            if not check["int8_within"]:
                log.warning("int8 logits differ from float32 by %.3g (more than the stated tolerance)",
                            check["int8"]["max_abs"])
        files = _stage_tokenizer(loaded, work, rf)
        meta = {"format": "onnx", "file": "model.onnx", "bytes": rf.stage("model.onnx").stat().st_size,
                "float32_bytes": fp32.stat().st_size,
                "quantize": req.quantize, "quantization": quant, "exporter": req.exporter, "opset": req.opset,
                "source": req.model, "base_model": loaded.base_spec, "kind": loaded.kind,
                "family": loaded.family.name, "model_type": loaded.config.model_type,
                **io_spec(loaded), "max_length": max_length, "tokenizer_files": files,
                "padding_side": getattr(loaded.tokenizer, "padding_side", "right"),
                "ffn_widths": ffn_widths(loaded.model), "attn_heads": head_counts(loaded.model),
                "params": count_params(loaded.model), "source_bytes": _weights_bytes(req.model),
                "export_s": export_s, "check": check, "versions": _versions(torch, onnx, ort), "created": now_iso()}
        rf.write_json(META, meta)
    return meta


def _stage_tokenizer(loaded, work: Path, rf: RunFolder) -> list[str]:
    """The tokenizer's files, each an output entry of the run folder."""
    tok_dir = work / "tokenizer"
    loaded.tokenizer.save_pretrained(tok_dir)
    names = sorted(p.name for p in tok_dir.iterdir() if p.is_file())
    for name in names:
        shutil.move(str(tok_dir / name), rf.stage(name))
    return names


def _weights_bytes(spec: str) -> int | None:
    """Bytes of a model folder's safetensors files (None for an alias or a hub id)."""
    from ..models.loading import resolve_saved

    p = Path(spec).expanduser()
    folder = resolve_saved(p) if p.is_dir() else None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder else None


def _versions(torch, onnx, ort) -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def check_runtime_for(req: ExportRequest) -> None:
    """The checks that need no model (the CLI runs them before anything is loaded)."""
    require_runtime()
    if req.exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError('--exporter dynamo needs onnxscript: pip install "anatomy-prune[deploy]"') from None
