"""Per-family adapters: where each block's FFN and attention are, which token is read out, how many positions
are usable.

This is the one place that knows the module layout of each supported architecture. Everything else asks
for `ffn_sites(model)` / `attention_sites(model)` and works on Linear / Conv1D modules through the helpers
below; `surgery.py` slices those modules.

Prunable units: an FFN neuron (a row of the up projection(s) and a column of the down projection), and an
attention *head unit*: for multi-head attention one head (its q / k / v rows and o columns); for
grouped-query attention (Llama-like) one key/value group (its k and v rows, and the rows of all the query
heads that share it, with their o columns), since a key/value head can only go with every query head that
reads it. A model without GQA in the Llama family has groups of one query head.
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


# --- attention: per-family layout, one site per block ------------------------------------------------

@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's self-attention is, by path under the block."""

    attn: str                 # the module computing q, k, v and the per-head context (replaced when headless)
    q: str
    k: str
    v: str
    o: str                    # the output projection: its input is the concatenated per-head context
    fused: bool = False       # q | k | v in one projection (GPT-2's c_attn, out = 3 * heads * head_dim)
    fields: tuple[str, ...] = ()  # attributes of the `attn` module that hold its head count or width
    o_dropout: str = ""       # a dropout the `attn` module applies to o's output (GPT-2's resid_dropout)
    returns: int = 2          # how many values the `attn` module returns (MPNet's: 1 unless asked for probs)


ATTENTION: dict[str, AttentionLayout] = {   # by family name, or by model type where a type differs
    "bert": AttentionLayout("attention.self", "attention.self.query", "attention.self.key",
                            "attention.self.value", "attention.output.dense",
                            fields=("num_attention_heads", "all_head_size")),
    "mpnet": AttentionLayout("attention.attn", "attention.attn.q", "attention.attn.k", "attention.attn.v",
                             "attention.attn.o", fields=("num_attention_heads", "all_head_size"), returns=1),
    "distilbert": AttentionLayout("attention", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                                  "attention.out_lin", fields=("n_heads",)),
    "gpt2": AttentionLayout("attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", fused=True,
                            fields=("num_heads", "split_size"), o_dropout="resid_dropout"),
    # Llama-like attention reads only head_dim and num_key_value_groups (query heads per key/value head),
    # which whole-group pruning leaves as they are; it keeps no head count of its own
    "llama": AttentionLayout("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj"),
}


def attention_layout(model_type: str) -> AttentionLayout:
    return ATTENTION.get(model_type) or ATTENTION[family_for(model_type).name]


def config_heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of every layer of an unpruned model with this config.
    The config is never changed by pruning heads: per-layer counts are read from the weights."""
    n = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0) or 0)
    if n <= 0:
        raise ValueError(f"config of type {getattr(config, 'model_type', '?')} has no attention head count")
    kv = n
    if family_for(config.model_type).name == "llama":
        kv = int(getattr(config, "num_key_value_heads", None) or n)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n)
    else:
        head_dim = int(config.hidden_size) // n
    return n, kv, head_dim


def config_head_units(config) -> int:
    """Head units per layer of an unpruned model: heads, or key/value groups under GQA (the Llama family)."""
    return config_heads(config)[1]


@dataclass(frozen=True)
class AttentionSite:
    """One block's self-attention, by module path under the base model, with its current head counts.

    The prunable unit is a key/value head with its `group` query heads (group = 1 without GQA): unit u owns
    query heads u*group .. u*group+group-1, i.e. the features [u*group*head_dim, (u+1)*group*head_dim) of
    q's output and of o's input, and the features [u*head_dim, (u+1)*head_dim) of k's and v's outputs.
    A layer whose every head was removed (n_heads == 0) has no q / k / v modules; `o` remains (bias only)."""

    layer: int
    attn: str                 # full path of the module that computes the heads' context
    q: str                    # full paths; for a fused layout q, k and v are the same module
    k: str
    v: str
    o: str
    fused: bool
    n_heads: int              # query heads now
    n_kv_heads: int           # key/value heads now (= head units)
    head_dim: int
    group: int                # query heads per key/value head (fixed by the config)

    @property
    def n_units(self) -> int:
        return self.n_kv_heads

    def q_features(self, units) -> list[int]:
        """Indices into q's outputs (and o's inputs) of the given units' query heads."""
        w = self.group * self.head_dim
        return [u * w + j for u in units for j in range(w)]

    def kv_features(self, units) -> list[int]:
        """Indices into k's and v's outputs of the given units' key/value heads."""
        return [u * self.head_dim + j for u in units for j in range(self.head_dim)]


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every block's self-attention, in layer order, with paths relative to `base_model(model)` and head
    counts read from the output projection's width (a per-layer count is never read from the config)."""
    base = base_model(model)
    fam = family_of(model)
    lay = attention_layout(base.config.model_type)
    n_cfg, kv_cfg, head_dim = config_heads(base.config)
    group = n_cfg // kv_cfg
    blocks = get_module(base, fam.layers)
    sites = []
    for i in range(len(blocks)):
        p = f"{fam.layers}.{i}."
        n = in_features(get_module(base, p + lay.o)) // head_dim
        sites.append(AttentionSite(i, p + lay.attn, p + lay.q, p + lay.k, p + lay.v, p + lay.o, lay.fused,
                                   n, n // group, head_dim, group))
    return sites


def head_counts(model: nn.Module) -> list[int]:
    """Head units (heads; key/value groups under GQA) in each layer, as the model is now."""
    return [s.n_units for s in attention_sites(model)]


def query_head_counts(model: nn.Module) -> list[int]:
    """Query heads in each layer, as the model is now."""
    return [s.n_heads for s in attention_sites(model)]


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
    if type(mod).__module__.startswith("torch.ao.nn.quantized") and hasattr(mod, "weight"):
        return mod.weight().dequantize()  # an int8 Linear (models.quantize): a float copy, for reading shapes
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
