"""Model folders anatomy-prune writes, and how they are read back, trusting nothing in them.

A saved model folder holds the transformer as `save_pretrained` writes it (config.json, model.safetensors),
the tokenizer, `head.safetensors` for a classifier, and `anatomy_prune.json`: kind, family, base model,
per-layer FFN widths and (as plain data) the plan that made it. A folder with uniform FFN widths also loads
with plain transformers (`AutoModel.from_pretrained`); per-layer widths need `anatomy_prune.load_model`.

Reading is defensive: the metadata is validated against a schema (types, ranges, sizes bounded by the
config) and every safetensors header is parsed and checked against the file size *before* any tensor is
allocated, so a damaged or hostile folder ends in a one-line UserError, never in a traceback or a huge
allocation.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UserError
from ..runfolder import now_iso, read_json, write_json
from .families import (attention_sites, base_model, base_model_kwargs, config_head_units, ffn_sites, ffn_widths,
                       get_module, head_counts, supported_model_types, weight_out_in)
from .loaded import KINDS, SAFE, SAVED_META, Loaded, finish_tokenizer
from .surgery import check_head_indices, resize_ffn, resize_heads, set_config_widths
from .trust import (MAX_HEADER, check_config_values, check_dtypes, check_float_weights,  # noqa: F401
                    check_tokenizer_fits, declared_weights, read_headers, safetensors_header)

log = logging.getLogger(__name__)
META_FORMAT = 1


def save_model(loaded: Loaded, folder: str | Path, plan: Mapping | None = None, *,
               max_shard_size: int | str | None = None, **info) -> Path:
    """Save a (possibly pruned) model into `folder` (a fresh staged folder: see runfolder.RunFolder).

    plan: the plan as plain data (PruningPlan.to_dict()), recorded in the metadata. max_shard_size (e.g.
    "2GB"): weights in shards model-0000i-of-0000n.safetensors of at most that size (transformers' default
    otherwise); a model placed by a device map is written shard by shard, offloaded weights read back as needed."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    widths = ffn_widths(model)
    set_config_widths(model, widths)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if loaded.kind == "classifier":
        model.backbone.save_pretrained(folder, safe_serialization=True, **shards)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.dense.state_dict().items()},
                  folder / "head.safetensors")
    else:
        model.save_pretrained(folder, safe_serialization=True, **shards)
    loaded.tokenizer.save_pretrained(folder)
    meta = dict(loaded.info)
    meta.update(info)
    meta.update(format=META_FORMAT, kind=loaded.kind, family=loaded.family.name, ffn_widths=widths,
                base_model=loaded.base_spec, saved=now_iso())
    meta.pop("attn_heads", None)
    heads = head_counts(model)  # head units per layer; transformers' configs cannot say per-layer heads
    if heads != [config_head_units(base_model(model).config)] * len(heads):
        meta["attn_heads"] = heads
    meta["output_biases"] = [p for p in output_projections(model)
                             if getattr(get_module(base_model(model), p), "bias", None) is not None]
    if plan is not None:
        meta["plan"] = dict(plan)
    if loaded.kind == "classifier":
        meta["dropout"] = float(model.dropout.p)
    write_json(folder / SAVED_META, meta)
    return folder


def output_projections(model: nn.Module) -> list[str]:
    """Paths (under the base model) of every FFN's down and every attention's output projection: where bias
    compensation (apply.bias) may have added a bias that the family's layout does not have."""
    return [s.down for s in ffn_sites(model)] + [s.o for s in attention_sites(model)]


def _add_output_biases(folder: Path, net: nn.Module, paths) -> None:
    """Zero biases on the listed output projections that the config builds without one (the weights fill them)."""
    allowed = set(output_projections(net))
    for p in paths or []:
        if p not in allowed:
            raise _bad(folder, f"{SAVED_META} 'output_biases' names {p!r}, not an output projection of the model")
        mod = get_module(base_model(net), p)
        if getattr(mod, "bias", None) is None:
            w = weight_out_in(mod)
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=False)


# --- validation -------------------------------------------------------------------------------------

def _bad(folder: Path, what: str) -> UserError:
    return UserError(f"'{folder}' is not a usable anatomy-prune model folder: {what}; save the model again")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_meta(meta: Any, folder: Path) -> dict:
    """Check anatomy_prune.json's fields that decide what is built; returns it. (Widths are checked against
    the config in load_saved.)"""
    if not isinstance(meta, dict):
        raise _bad(folder, f"{SAVED_META} is not a JSON object")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise _bad(folder, f"{SAVED_META} has kind {kind!r} (expected one of {', '.join(KINDS)})")
    widths = meta.get("ffn_widths")
    if widths is not None:
        if not isinstance(widths, list) or not all(_is_int(w) and w >= 0 for w in widths):
            raise _bad(folder, f"{SAVED_META} 'ffn_widths' must be a list of non-negative whole numbers")
    heads = meta.get("attn_heads")
    if heads is not None:
        if not isinstance(heads, list) or not all(_is_int(h) and h >= 0 for h in heads):
            raise _bad(folder, f"{SAVED_META} 'attn_heads' must be a list of non-negative whole numbers")
    if "dropout" in meta:
        d = meta["dropout"]
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not (0.0 <= float(d) < 1.0):
            raise _bad(folder, f"{SAVED_META} 'dropout' must be a number in [0, 1), got {d!r}")
    for key in ("max_length",):
        if key in meta and meta[key] is not None and not (_is_int(meta[key]) and meta[key] > 0):
            raise _bad(folder, f"{SAVED_META} '{key}' must be a positive whole number, got {meta[key]!r}")
    biases = meta.get("output_biases")
    if biases is not None and (not isinstance(biases, list) or not all(isinstance(b, str) for b in biases)):
        raise _bad(folder, f"{SAVED_META} 'output_biases' must be a list of module paths")
    for key in ("plan", "finetune", "pruned"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise _bad(folder, f"{SAVED_META} '{key}' must be a JSON object")
    return meta


def _check_shapes(folder: Path, headers: Mapping[str, tuple], expected: Mapping[str, torch.Size]) -> None:
    """Every tensor in the files must exist in the model with the same shape (found before loading)."""
    unexpected = [k for k in headers if k not in expected]
    wrong = [k for k, (_d, s) in headers.items() if k in expected and tuple(expected[k]) != s]
    if unexpected or wrong:
        k = (wrong or unexpected)[0]
        detail = (f"tensor '{k}' has shape {list(headers[k][1])} but the model needs {list(expected[k])}"
                  if wrong else f"tensor '{k}' is not part of the model")
        raise _bad(folder, detail + " (widths in anatomy_prune.json disagree with the weights?)")


def refuse_oversized_config(folder: Path, headers: Mapping[str, tuple], build) -> None:
    """A config.json that describes a model far larger than the weights beside it (damaged, or hostile: an
    FFN 10^8 wide is 77 GB) is refused before anything is allocated: `build()` runs on the meta device, where
    parameters take no memory, and its parameters are counted against the tensors the files hold."""
    try:
        with torch.device("meta"):
            need = sum(p.numel() for p in build().parameters())
    except Exception:  # noqa: BLE001 - the real build reports what is wrong with the config
        return
    have = sum(math.prod(shape) for _dtype, shape in headers.values())
    if need > 2 * have + (1 << 20):
        raise UserError(f"'{folder / 'config.json'}' describes a model of {need:,} parameters but its weights hold "
                        f"{have:,}; the config does not belong to these weights (save the model again)")


def needs_custom_code(folder: Path) -> bool:
    """Whether a folder's config.json asks for code shipped with the model (auto_map), which is never run."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(cfg, dict) and "auto_map" in cfg


def custom_code_error(folder: Path) -> UserError:
    return UserError(f"'{folder}' needs custom code (config.json auto_map) that anatomy-prune never runs; give a "
                     "model of a supported type (see README) or its converted folder")


# --- loading -----------------------------------------------------------------------------------------

def _shaped(net, kind: str, widths, heads):
    """The size check's model (see refuse_oversized_config): what load_saved builds, FFNs and heads resized."""
    if kind in ("classifier", "backbone"):
        net = base_model(net)
    if widths is not None and widths != ffn_widths(net) and max(widths, default=0) <= max(ffn_widths(net)):
        resize_ffn(net, widths)
    if heads is not None:
        try:
            resize_heads(net, heads)
        except ValueError:
            pass  # load_saved refuses these heads itself
    return net


def _read_config(folder: Path):
    """config.json, its values checked, read by transformers, of a supported model type."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise _bad(folder, "config.json is missing")
    check_config_values(read_json(folder / "config.json", "model config"), f"'{folder / 'config.json'}'",
                        set(supported_model_types()))
    try:
        cfg = AutoConfig.from_pretrained(folder, **SAFE)
    except Exception as exc:  # malformed JSON, unknown model type, ...
        if needs_custom_code(folder):
            raise custom_code_error(folder) from None
        raise _bad(folder, f"config.json cannot be read ({type(exc).__name__})") from None
    if getattr(cfg, "model_type", None) not in supported_model_types():
        raise _bad(folder, f"model type {getattr(cfg, 'model_type', None)!r} is not supported")
    return cfg


def _read_tokenizer(folder: Path, cfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, **SAFE)
    except Exception as exc:
        raise _bad(folder, f"its tokenizer cannot be read ({type(exc).__name__})") from None
    check_tokenizer_fits(tok, getattr(cfg, "vocab_size", None), f"'{folder}'")
    return tok


def _check_saved_sizes(folder: Path, meta: dict, cfg) -> int:
    """The metadata's FFN widths and head counts against the config, before anything big is built from them;
    returns the config's number of layers."""
    widths = meta.get("ffn_widths")
    n_layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)) or 0)
    full = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or \
        getattr(cfg, "hidden_dim", None) or 4 * int(getattr(cfg, "n_embd", getattr(cfg, "hidden_size", 0)) or 0)
    cfg_widths = getattr(cfg, "anatomy_prune_ffn_widths", None)
    if widths is not None:
        if len(widths) != n_layers:
            raise _bad(folder, f"{SAVED_META} lists {len(widths)} FFN widths for {n_layers} layers")
        bound = max(int(full or 0), max(cfg_widths or [0]))
        if bound and max(widths, default=0) > bound:
            raise _bad(folder, f"{SAVED_META} FFN widths exceed the config's {bound}")
    heads = meta.get("attn_heads")
    if heads is not None:
        try:
            units = config_head_units(cfg)
        except (ValueError, TypeError, AttributeError):
            raise _bad(folder, "config.json has no usable attention head count") from None
        if len(heads) != n_layers or max(heads, default=0) > units:
            raise _bad(folder, f"{SAVED_META} 'attn_heads' must give {n_layers} head counts of at most {units}")
    return n_layers


def _build_net(folder: Path, cfg, meta: dict, headers) -> nn.Module:
    """The network its config builds (its size checked first), resized to the saved widths and heads."""
    from transformers import AutoModel, AutoModelForCausalLM

    kind, widths, heads = meta["kind"], meta.get("ffn_widths"), meta.get("attn_heads")
    builder = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    kw = {} if kind == "causal-lm" else base_model_kwargs(cfg.model_type)
    refuse_oversized_config(folder, headers,
                            lambda: _shaped(builder.from_config(cfg, **kw, **SAFE), kind, widths, heads))
    try:
        with torch.random.fork_rng(devices=[]):
            net = builder.from_config(cfg, **kw, **SAFE)
    except Exception as exc:
        raise _bad(folder, f"its config cannot be built ({type(exc).__name__})") from None
    if kind in ("classifier", "backbone"):
        net = base_model(net)
    if widths is not None and widths != ffn_widths(net):
        if max(widths) > max(ffn_widths(net)):  # the config says uniform full width: widths must fit under it
            raise _bad(folder, f"{SAVED_META} FFN widths exceed the config's")
        resize_ffn(net, widths)
    if heads is not None:
        try:
            resize_heads(net, heads)
        except ValueError:
            raise _bad(folder, f"{SAVED_META} 'attn_heads' do not fit the model its config builds") from None
    _add_output_biases(folder, net, meta.get("output_biases"))
    return net


def _load_weights(folder: Path, net: nn.Module, weights: list[Path], headers, heads) -> None:
    """The saved weights into `net`, their shapes and dtypes checked first; tied heads tied again."""
    from safetensors.torch import load_file

    _check_shapes(folder, headers, {k: v.shape for k, v in net.state_dict().items()})
    check_dtypes(folder, headers, net.state_dict())
    state = {}
    try:
        for w in weights:
            state.update(load_file(w))
    except Exception as exc:  # safetensors' own errors (SafetensorError) after our checks: still one line
        raise _bad(folder, f"{weights[0].name} cannot be read ({type(exc).__name__})") from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    tied = [k for k in missing if k.endswith("lm_head.weight")]
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise _bad(folder, f"weights do not match its config (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    if any(k.endswith("lm_head.weight") for k in missing):
        net.tie_weights()
    if heads is not None:
        try:
            check_head_indices(net)
        except ValueError as exc:
            raise _bad(folder, str(exc)) from None


def _with_head(folder: Path, net: nn.Module, meta: dict) -> nn.Module:
    """A classifier's binary head from head.safetensors on top of `net`; other kinds as they are."""
    from safetensors.torch import load_file

    from .classifier import BinaryClassifier

    if meta["kind"] != "classifier":
        return net
    model = BinaryClassifier(net, dropout=float(meta.get("dropout", 0.1)))
    head = folder / "head.safetensors"
    if not head.is_file():
        raise _bad(folder, "it is a classifier without head.safetensors")
    head_header = safetensors_header(head)
    _check_shapes(folder, head_header, {k: v.shape for k, v in model.dense.state_dict().items()})
    check_dtypes(folder, head_header, model.dense.state_dict())
    hstate = load_file(head)
    if set(hstate) != set(model.dense.state_dict()):
        raise _bad(folder, "head.safetensors does not hold the classifier head")
    model.dense.load_state_dict(hstate)
    return model


def load_saved(folder: Path, spec: str) -> Loaded:
    """Rebuild a model saved by save_model: from its config, FFNs resized to the saved widths, then the
    weights, everything checked first."""
    meta = validate_meta(read_json(folder / SAVED_META, "model metadata"), folder)
    cfg = _read_config(folder)
    weights = declared_weights(folder, saved=True)
    headers = read_headers(weights)
    check_float_weights(folder, headers)
    tok = _read_tokenizer(folder, cfg)
    n_layers = _check_saved_sizes(folder, meta, cfg)
    net = _build_net(folder, cfg, meta, headers)
    _load_weights(folder, net, weights, headers, meta.get("attn_heads"))
    model = _with_head(folder, net, meta)
    finish_tokenizer(tok, model)
    model.eval()
    if len(ffn_sites(model)) != n_layers and n_layers:
        raise _bad(folder, "its layers do not match its config")
    if meta.get("quantize") is not None:  # the float weights are stored; int8 is re-derived, deterministically
        from .quantize import QUANTIZE, quantize_int8
        if meta["quantize"] not in QUANTIZE:
            raise _bad(folder, f"{SAVED_META} asks for quantize {meta['quantize']!r}; known: {', '.join(QUANTIZE)}")
        model = quantize_int8(model, meta["quantize"])
    return Loaded(model=model, tokenizer=tok, kind=meta["kind"], spec=spec, info=meta)
