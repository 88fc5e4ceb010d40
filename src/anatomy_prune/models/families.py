"""Per-family adapters: where each block's FFN is, which token is read out, how many positions are usable.

This is the one place that knows the module layout of each supported architecture. Everything else asks
for `ffn_sites(model)` and works on Linear / Conv1D modules through the helpers below; `surgery.py` slices
those modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError

try:  # transformers' GPT-2 linear layer, which stores its weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Family:
    """Module layout of one architecture family, by attribute path under the base model."""

    name: str
    model_types: tuple[str, ...]
    layers: str               # path to the ModuleList of blocks under the base model
    up: tuple[str, ...]       # per block: d_model -> d_ff projections (gated families have two: gate, up)
    down: str                 # per block: d_ff -> d_model; neuron j's output vector is its j-th input column
    act: str                  # per block: the FFN's activation module
    readout: str              # "cls" (first token) or "last" (last non-padding token)
    decoder: bool

    @property
    def gated(self) -> bool:
        return len(self.up) == 2


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "mpnet", "electra", "camembert"), "encoder.layer",
           ("intermediate.dense",), "output.dense", "intermediate.intermediate_act_fn", "cls", False),
    Family("distilbert", ("distilbert",), "transformer.layer",
           ("ffn.lin1",), "ffn.lin2", "ffn.activation", "cls", False),
    Family("gpt2", ("gpt2",), "h", ("mlp.c_fc",), "mlp.c_proj", "mlp.act", "last", True),
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo"), "layers",
           ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn", "last", True),
)


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")  # positions start at padding_idx + 1


def usable_positions(config) -> int:
    """How many tokens a sequence may have: the position table's size, less the offset that RoBERTa-like and
    MPNet models reserve (their positions start at padding_idx + 1, so 514 entries hold 512 tokens)."""
    n = None
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            n = int(getattr(config, name))
            break
    if n is None:
        return 10**9
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        n -= int(getattr(config, "pad_token_id", 1) or 1) + 1
    return n


POOLED = ("bert", "roberta", "xlm-roberta", "camembert", "mpnet")  # base models built with a pooler by default


def base_model_kwargs(model_type: str) -> dict:
    """Arguments for building a base model: no pooler (nothing here reads it; a reloaded one would be random)."""
    return {"add_pooling_layer": False} if model_type in POOLED else {}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UserError(
        f"model type '{model_type}' is not supported; supported types: {', '.join(supported_model_types())}"
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)


@dataclass(frozen=True)
class FFNSite:
    """One block's feed-forward network, by module path under the base model."""

    layer: int
    block: str                # path of the block, e.g. "encoder.layer.3"
    up: tuple[str, ...]       # full paths of the d_model -> d_ff projections
    down: str                 # full path of the d_ff -> d_model projection
    act: str                  # full path of the activation module


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without task heads (BertModel, GPT2Model, LlamaModel...)."""
    inner = getattr(model, "backbone", model)  # our BinaryClassifier wraps a backbone
    return getattr(inner, "base_model", inner)


def family_of(model: nn.Module) -> Family:
    return family_for(base_model(model).config.model_type)


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """Every block's FFN, in layer order, with paths relative to `base_model(model)`."""
    fam = family_of(model)
    blocks = get_module(base_model(model), fam.layers)
    sites = []
    for i in range(len(blocks)):
        prefix = f"{fam.layers}.{i}."
        sites.append(FFNSite(i, prefix[:-1], tuple(prefix + u for u in fam.up), prefix + fam.down, prefix + fam.act))
    return sites


def ffn_widths(model: nn.Module) -> list[int]:
    """Number of FFN neurons (d_ff) in each layer, as the model is now."""
    base = base_model(model)
    return [out_features(get_module(base, s.up[0])) for s in ffn_sites(model)]


# --- Linear / Conv1D helpers: one orientation everywhere, [out, in] ------------------------------

def weight_out_in(mod: nn.Module) -> Tensor:
    """The layer's weight as [out, in], whatever the module stores (Conv1D stores [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if Conv1D and isinstance(mod, Conv1D):
        return mod.weight.t()
    raise TypeError(f"unsupported projection module {type(mod).__name__}")


def out_features(mod: nn.Module) -> int:
    return weight_out_in(mod).shape[0]


def in_features(mod: nn.Module) -> int:
    return weight_out_in(mod).shape[1]


def neuron_output_vectors(model: nn.Module, site: FFNSite) -> Tensor:
    """What each neuron adds to the residual stream per unit activation: [d_ff, d_model]."""
    down = get_module(base_model(model), site.down)
    return weight_out_in(down).t()  # [d_ff, d_model]


def readout_index(family: Family, attention_mask: Tensor) -> Tensor:
    """Position of the readout token in each row: 0 for CLS, else the last non-padding token.  # [batch]"""
    if family.readout == "cls":
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    # cumsum reaches its maximum first at the last 1, for left or right padding alike
    return attention_mask.long().cumsum(dim=1).argmax(dim=1)


def gather_readout(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden [batch, pos, d] at per-row positions index [batch] -> [batch, d]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
