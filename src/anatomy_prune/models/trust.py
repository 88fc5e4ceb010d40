"""What a model folder may hold, checked before anything is allocated: which weight files are read (only
`model.safetensors` or the files its index names), each safetensors header (dtypes, shapes, the file covered
exactly), the config's values (finite numbers, positive sizes, a supported type, no quantization), and a
tokenizer whose ids fit the embeddings. Every refusal is a one-line UserError naming the file."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError

MAX_HEADER = 64 * 1024 * 1024        # a safetensors JSON header larger than this is refused
FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
INTS = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
DTYPE_BYTES = {**FLOATS, **INTS}     # complex and 8-bit float tensors are never part of a model we load
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
# config keys that count something: whole numbers > 0 where present (None: the model's default)
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner",
             "n_positions", "dim", "n_layers", "n_heads", "hidden_dim", "embedding_size")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _plain_file(folder: Path, name: str, what: str) -> Path:
    """folder/name where name is one plain component naming a regular file inside the folder."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"'{folder / INDEX}' names '{name}', which is not a file in the folder; save the model again")
    p = folder / name
    if p.is_symlink() and p.resolve().parent != folder.resolve():
        raise UserError(f"'{p}' is a link that leads outside the model folder; {what}")
    if not p.is_file():
        kind = "a folder" if p.is_dir() else "missing"
        raise UserError(f"'{p}' is {kind}, not a weights file; {what}")
    return p


def declared_weights(folder: Path, *, saved: bool = False) -> list[Path]:
    """The weight files a folder declares: the files its index names, else model.safetensors. In a folder
    anatomy-prune saved (`saved`), any other *.safetensors but head.safetensors is refused: it could only
    be meant to override a tensor."""
    fix = "save the model again" if saved else "give a folder written by save_pretrained"
    if (folder / INDEX).exists():
        try:
            index = json.loads(_plain_file(folder, INDEX, fix).read_text(encoding="utf-8"))
            names = index["weight_map"]
            ok = isinstance(names, dict) and names and all(isinstance(v, str) for v in names.values())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
            ok = False
        if not ok:
            raise UserError(f"'{folder / INDEX}' is not a safetensors index (a weight_map of tensor -> file); {fix}")
        files = [_plain_file(folder, n, fix) for n in sorted(set(names.values()))]
    else:
        files = [_plain_file(folder, WEIGHTS, fix)]
    if saved:
        extra = sorted(p.name for p in folder.glob("*.safetensors") if p not in files and p.name != "head.safetensors")
        if extra:
            raise UserError(f"'{folder / extra[0]}' is not a weights file this model declares (it would override "
                            f"{WEIGHTS}); remove it or save the model again")
    return files


def safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors file's header without loading tensors: {name: (dtype, shape)}.

    Refuses a folder or a truncated file, an oversized or non-JSON header, dtypes that are not real numbers,
    offsets that overlap, leave gaps or run past the end, trailing bytes, and shapes that disagree with their
    byte counts."""
    where = f"'{path}'"
    if not path.is_file():
        raise UserError(f"{where} is not a file (a folder?); save the model again")
    size = path.stat().st_size
    if size < 8:
        raise UserError(f"{where} is truncated (not a safetensors file); save the model again")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or n > MAX_HEADER or 8 + n > size:
            raise UserError(f"{where} has a damaged header ({n} bytes declared, file {size} bytes); save the model again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{where} has a header that is not JSON (not a safetensors file); save the model again") from None
    if not isinstance(header, dict):
        raise UserError(f"{where} has a malformed header; save the model again")
    data_len = size - 8 - n
    spans, out = [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{where}: tensor {name!r} has a malformed entry; save the model again") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise UserError(f"{where}: tensor {name!r} has dtype {str(dtype)[:20]!r}, not a real number type; "
                            "save the model again")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and s >= 0 for s in shape):
            raise UserError(f"{where}: tensor {name!r} has a bad shape; save the model again")
        if not (_is_int(a) and _is_int(b) and 0 <= a <= b <= data_len):
            raise UserError(f"{where}: tensor {name!r} lies outside the file (truncated?); save the model again")
        if (b - a) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise UserError(f"{where}: tensor {name!r} has {b - a} bytes for shape {shape}; save the model again")
        spans.append((a, b))
        out[name] = (dtype, tuple(shape))
    end = 0
    for a, b in sorted(spans):
        if a < end:
            raise UserError(f"{where} has overlapping tensors; save the model again")
        if a > end:
            raise UserError(f"{where} has {a - end} bytes between its tensors; save the model again")
        end = b
    if end != data_len:
        raise UserError(f"{where} has {data_len - end} bytes after its tensors; save the model again")
    return out


def read_headers(files: list[Path]) -> dict:
    """The headers of all weight files; a tensor in two files is refused (one would override the other)."""
    headers: dict[str, tuple] = {}
    for f in files:
        h = safetensors_header(f)
        twice = sorted(set(h) & set(headers))
        if twice:
            raise UserError(f"'{f}' holds tensor '{twice[0]}' that another weights file holds too; save the model again")
        headers.update(h)
    return headers


def check_float_weights(folder: Path, headers: Mapping[str, tuple]) -> None:
    """Weights and biases are stored as floats: an integer tensor where a float is meant is refused."""
    for name, (dtype, _shape) in headers.items():
        if name.rsplit(".", 1)[-1] in ("weight", "bias") and dtype not in FLOATS:
            raise UserError(f"'{folder}': tensor '{name}' is stored as {dtype}, but the model needs floats; "
                            "save the model again")


def check_dtypes(folder: Path, headers: Mapping[str, tuple], expected: Mapping[str, Any]) -> None:
    """Each stored tensor's dtype fits the model's tensor of that name (float for float, int for int)."""
    for name, (dtype, _shape) in headers.items():
        want = expected.get(name)
        if want is not None and want.is_floating_point() != (dtype in FLOATS):
            raise UserError(f"'{folder}': tensor '{name}' is stored as {dtype}, but the model needs "
                            f"{'floats' if want.is_floating_point() else 'integers'}; save the model again")


def _non_finite(obj: Any, path: str = "", depth: int = 0) -> str | None:
    """The key path of the first NaN or infinity in a JSON value, or None."""
    if depth > 32:
        return path or "(top)"
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "(top)"
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = _non_finite(v, f"{path}.{k}" if path else str(k), depth + 1)
            if bad:
                return bad
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            bad = _non_finite(v, f"{path}[{i}]", depth + 1)
            if bad:
                return bad
    return None


def check_config_values(cfg: Any, where: str, supported: set[str] | None = None) -> None:
    """A config (as a dict) anatomy-prune will build: finite numbers, positive sizes, no quantization,
    a supported model type."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where} is not a JSON object; give a folder written by save_pretrained")
    bad = _non_finite(cfg)
    if bad:
        raise UserError(f"{where}: '{bad}' is not a finite number; fix the config")
    for key in SIZE_KEYS:
        v = cfg.get(key)
        if v is not None and not (_is_int(v) and 0 < v < 1 << 40):
            raise UserError(f"{where}: '{key}' must be a whole number above 0, got {str(v)[:20]}; fix the config")
    if cfg.get("quantization_config"):
        q = cfg["quantization_config"]
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise UserError(f"{where} describes quantized weights ({str(method)[:20]}); anatomy-prune loads float "
                        "weights only: give the float model")
    mt = cfg.get("model_type")
    if supported is not None and (not isinstance(mt, str) or mt not in supported):
        raise UserError(f"{where}: model type {str(mt)[:30]!r} is not supported; give one of "
                        f"{', '.join(sorted(supported))}")


def check_tokenizer_fits(tok, vocab_size: int | None, where: str) -> None:
    """Every id the tokenizer can produce must index the embedding table."""
    if not _is_int(vocab_size):
        return
    try:
        top = max(tok.get_vocab().values(), default=-1)
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary map: its length is the bound
        top = len(tok) - 1
    if top >= vocab_size:
        raise UserError(f"{where}: the tokenizer makes ids up to {top} but the embeddings hold {vocab_size}; "
                        "the tokenizer does not belong to this model")
