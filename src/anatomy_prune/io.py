"""Run folders: write results and models so that nothing is half-written, and read models back.

A saved model folder holds the transformer as `save_pretrained` writes it (config.json, model.safetensors),
the tokenizer, `head.safetensors` for a classifier, and `anatomy_prune.json`: kind, base model, per-layer
FFN widths and the pruning plan that made it. A folder with uniform FFN widths also loads with plain
transformers (`AutoModel.from_pretrained`); per-layer widths need `anatomy_prune.load_model(folder)`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError
from .families import base_model, ffn_widths
from .models import SAVED_META, Loaded, _finish_tokenizer
from .plan import PruningPlan

log = logging.getLogger(__name__)
META_FORMAT = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, obj) -> None:
    """Write JSON through a temporary file, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    Files of an existing `path` that the block does not write are kept (so a run folder can grow), unless
    overwrite is False, in which case an existing folder is an error.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output '{path}' exists and is not a folder; choose another --out")
    if path.exists() and not overwrite:
        raise UserError(f"output folder '{path}' already exists; remove it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a run folder is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        for item in path.iterdir():
            if not (tmp / item.name).exists():
                os.replace(item, tmp / item.name)
        old = path.with_name(f".{path.name}.old.{os.getpid()}.{time.time_ns()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# --- models -------------------------------------------------------------------------------------

def save_model(loaded: Loaded, folder: str | Path, plan: PruningPlan | None = None, **info) -> Path:
    """Save a (possibly pruned) model into `folder` (which should be fresh, e.g. from atomic_dir)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    widths = ffn_widths(model)
    from .apply import set_config_widths
    set_config_widths(model, widths)
    if loaded.kind == "classifier":
        model.backbone.save_pretrained(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.dense.state_dict().items()},
                  folder / "head.safetensors")
    else:
        model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    meta = dict(loaded.info)
    meta.update(info)
    meta.update(format=META_FORMAT, kind=loaded.kind, family=loaded.family.name, ffn_widths=widths,
                base_model=loaded.base_spec, saved=now_iso())
    if plan is not None:
        meta["plan"] = plan.to_dict()
    if loaded.kind == "classifier":
        meta["dropout"] = float(model.dropout.p)
    write_json(folder / SAVED_META, meta)
    return folder


def load_saved(folder: Path, spec: str) -> Loaded:
    """Rebuild a model saved by save_model: from its config, FFNs resized to the saved widths, then weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .apply import resize_ffn
    from .classifier import BinaryClassifier

    meta = read_json(folder / SAVED_META)
    kind = meta.get("kind")
    if kind not in ("classifier", "causal-lm", "backbone"):
        raise UserError(f"'{folder / SAVED_META}' has unknown kind '{kind}'; re-save the model with anatomy-prune")
    cfg = AutoConfig.from_pretrained(folder)
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        raise UserError(f"'{folder}' has no model.safetensors; the folder is incomplete, save the model again")
    builder = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    with torch.random.fork_rng(devices=[]):
        net = builder.from_config(cfg)
    if kind == "classifier" or kind == "backbone":
        net = base_model(net)
    widths = meta.get("ffn_widths") or ffn_widths(net)
    if widths != ffn_widths(net):
        resize_ffn(net, widths)
    state = {}
    for w in weights:
        state.update(load_file(w))
    missing, unexpected = net.load_state_dict(state, strict=False)
    tied = [k for k in missing if k.endswith("lm_head.weight") or k.endswith("pooler.dense.weight")
            or k.endswith("pooler.dense.bias")]
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise UserError(f"'{folder}' does not match its config (missing {real_missing[:3]}, unexpected "
                        f"{unexpected[:3]}); the folder is damaged, save the model again")
    if any(k.endswith("lm_head.weight") for k in missing):
        net.tie_weights()
    if kind == "classifier":
        model = BinaryClassifier(net, dropout=meta.get("dropout", 0.1))
        head = folder / "head.safetensors"
        if not head.is_file():
            raise UserError(f"'{folder}' is a classifier without head.safetensors; save the model again")
        model.dense.load_state_dict(load_file(head))
    else:
        model = net
    tok = AutoTokenizer.from_pretrained(folder)
    _finish_tokenizer(tok, model)
    model.eval()
    return Loaded(model=model, tokenizer=tok, kind=kind, spec=spec, info=meta)
