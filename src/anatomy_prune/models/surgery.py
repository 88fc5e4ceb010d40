"""Model surgery: rebuild projection modules with fewer rows or columns, so an FFN (and, for attention, a set
of heads) becomes physically smaller. Linear and GPT-2's Conv1D alike, dtype and device kept, weights
contiguous (strided weights make the matrix multiplies slower). Plans and methods live in later stages;
this module only takes lists of ids to keep.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor, nn

from .families import (AttentionSite, Conv1D, attention_layout, attention_sites, base_model, config_heads, family_of,
                       ffn_sites, ffn_widths, get_module, head_counts, set_module, weight_out_in)


class SafeConv1D(Conv1D if Conv1D else nn.Module):  # type: ignore[misc]
    """GPT-2's Conv1D that also works with zero inputs or outputs (a layer whose neurons are all removed)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.numel() == 0:
            return self.bias.expand(*x.shape[:-1], self.nf).clone() if self.bias is not None else x.new_zeros(
                *x.shape[:-1], self.nf)
        return super().forward(x)


def make_projection(like: nn.Module, weight_out_in_: Tensor, bias: Tensor | None) -> nn.Module:
    """A module of `like`'s type holding the given [out, in] weight (Conv1D stores it as [in, out])."""
    out_f, in_f = weight_out_in_.shape
    if isinstance(like, nn.Linear):
        new = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight_out_in_.contiguous(), requires_grad=like.weight.requires_grad)
    elif Conv1D and isinstance(like, Conv1D):
        new = SafeConv1D.__new__(SafeConv1D)
        nn.Module.__init__(new)
        new.nf, new.nx = out_f, in_f
        new.weight = nn.Parameter(weight_out_in_.t().contiguous(), requires_grad=like.weight.requires_grad)
    else:
        raise TypeError(f"unsupported projection module {type(like).__name__}")
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=like.bias.requires_grad)
    return new


def slice_out(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep output features idx of a projection (its rows, and their bias entries)."""
    w = weight_out_in(mod).detach()[idx]
    b = mod.bias.detach()[idx] if getattr(mod, "bias", None) is not None else None
    return make_projection(mod, w, b)


def slice_in(mod: nn.Module, idx: Tensor) -> nn.Module:
    """Keep input features idx of a projection (its columns; its bias is untouched)."""
    w = weight_out_in(mod).detach()[:, idx]
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return make_projection(mod, w, b)


def set_config_widths(model: nn.Module, widths: Sequence[int]) -> None:
    """Record per-layer FFN widths in the config; a uniform width also sets the family's own field, so
    plain transformers can load such a model."""
    cfg = base_model(model).config
    cfg.anatomy_prune_ffn_widths = list(widths)
    if len(set(widths)) == 1:
        fam = family_of(model).name
        field = {"gpt2": "n_inner", "distilbert": "hidden_dim"}.get(fam, "intermediate_size")
        setattr(cfg, field, int(widths[0]))


def keep_ffn_neurons(model: nn.Module, keep: Sequence[Sequence[int]]) -> nn.Module:
    """Keep only the listed neurons of each layer's FFN, in place (keep[layer] = sorted ids); returns it."""
    base = base_model(model)
    sites = ffn_sites(model)
    if len(keep) != len(sites):
        raise ValueError(f"{len(keep)} layers of neuron ids for a model with {len(sites)} layers")
    for site in sites:
        dev = weight_out_in(get_module(base, site.down)).device
        idx = torch.as_tensor(list(keep[site.layer]), dtype=torch.long, device=dev)
        for path in site.up:
            set_module(base, path, slice_out(get_module(base, path), idx))
        set_module(base, site.down, slice_in(get_module(base, site.down), idx))
    set_config_widths(model, [len(k) for k in keep])
    return model


def resize_ffn(model: nn.Module, widths: Sequence[int]) -> nn.Module:
    """Give each layer's FFN the given width (its first neurons), before a state dict is loaded into it."""
    full = ffn_widths(model)
    if len(widths) != len(full) or any(not 0 <= w <= f for w, f in zip(widths, full)):
        raise ValueError(f"widths {list(widths)[:4]}... do not fit the model's FFN widths {full[:4]}...")
    return keep_ffn_neurons(model, [range(w) for w in widths])


# --- attention heads ----------------------------------------------------------------------------------

class HeadlessAttention(nn.Module):
    """Stands in for the self-attention of a layer whose every head was removed: the output is the output
    projection applied to an empty context ([batch, pos, 0]), i.e. its bias broadcast (zero without a bias).

    transformers' attention classes cannot run with zero heads (they reshape with -1, which a tensor with no
    elements cannot resolve), so the layer's attention module is replaced by this one. It keeps the output
    projection (and GPT-2's residual dropout) under their own names, so the state dict is the attention's,
    less q / k / v. BERT-like models apply the output projection outside (`attention.output.dense`); there
    this module only returns the empty context. In a decoder's key/value cache it stores one placeholder
    element per position, so the cache still counts this layer's positions (a layer whose keys are empty
    reports length 0, and transformers reads the length of layer 0 to place new tokens)."""

    def __init__(self, children: dict[str, nn.Module], o_name: str = "", dropout_name: str = "",
                 layer_idx: int | None = None, returns: int = 2):
        super().__init__()
        for name, mod in children.items():
            self.add_module(name, mod)
        self.o_name, self.dropout_name, self.layer_idx, self.returns = o_name, dropout_name, layer_idx, returns

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        ctx = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # [batch, pos, 0]: no head, no context
        cache = kwargs.get("past_key_values")
        if cache is not None and self.layer_idx is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            place = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # [b, 1, pos, 1]
            cache.update(place, place, self.layer_idx)
        out = getattr(self, self.o_name)(ctx) if self.o_name else ctx  # [batch, pos, d_model] (or [.., 0])
        if self.dropout_name:
            out = getattr(self, self.dropout_name)(out)
        return (out,) if self.returns == 1 else (out, None)


@functools.cache
def _head_indexed(cls: type) -> type:
    """MPNet's self-attention, for a layer that kept some of its heads: MPNet computes one relative position
    bias for all heads of the model ([batch, heads, pos, pos]) and hands it to every layer, so each pruned
    layer takes the rows of the heads it kept (`head_index`, a buffer saved with the weights)."""
    def forward(self, hidden_states, attention_mask=None, position_bias=None, *args, **kwargs):
        if position_bias is not None:
            position_bias = position_bias.index_select(1, self.head_index)
        return cls.forward(self, hidden_states, attention_mask, position_bias, *args, **kwargs)
    return type(f"HeadPruned{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def _check_units(site: AttentionSite, units: Sequence[int]) -> list[int]:
    ids = sorted(int(u) for u in units)
    if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= site.n_units)):
        raise ValueError(f"layer {site.layer}: kept head units {ids[:8]} must be distinct and in [0, {site.n_units})")
    return ids


def _make_headless(base: nn.Module, site: AttentionSite) -> None:
    lay = attention_layout(base.config.model_type)
    attn = get_module(base, site.attn)
    o = get_module(base, site.o)
    o = slice_in(o, torch.zeros(0, dtype=torch.long, device=weight_out_in(o).device))  # [d_model, 0]: bias only
    children, o_name = {}, ""
    if site.o.startswith(site.attn + "."):  # the attention module applies o itself
        o_name = site.o[len(site.attn) + 1:]
        children[o_name] = o
    else:                                   # BERT-like: o is applied after the attention module
        set_module(base, site.o, o)
    if lay.o_dropout:
        children[lay.o_dropout] = getattr(attn, lay.o_dropout)
    set_module(base, site.attn, HeadlessAttention(children, o_name, lay.o_dropout, getattr(attn, "layer_idx", None),
                                                  lay.returns))


def keep_heads(model: nn.Module, keep: Sequence[Sequence[int]]) -> nn.Module:
    """Keep only the listed head units of each layer's self-attention, in place; returns the model.

    keep[layer] = ids of the units kept: heads, or key/value groups under GQA (see families.AttentionSite),
    numbered as the model is now. q / k / v lose the removed units' rows (and biases; GPT-2's fused c_attn
    loses them from each of its three parts), o its columns, and the attention module's head count and
    width fields (families.AttentionLayout.fields) are set to the kept ones. A layer left with no head gets
    a HeadlessAttention; a layer that keeps every unit is not touched."""
    base = base_model(model)
    sites = attention_sites(model)
    if len(keep) != len(sites):
        raise ValueError(f"{len(keep)} layers of head ids for a model with {len(sites)} layers")
    lay = attention_layout(base.config.model_type)
    for site in sites:
        units = _check_units(site, keep[site.layer])
        if units == list(range(site.n_units)):
            continue
        if not units:
            _make_headless(base, site)
            continue
        attn = get_module(base, site.attn)
        dev = weight_out_in(get_module(base, site.o)).device
        qf = torch.as_tensor(site.q_features(units), dtype=torch.long, device=dev)
        kvf = torch.as_tensor(site.kv_features(units), dtype=torch.long, device=dev)
        if site.fused:  # q | k | v, each n_heads * head_dim wide (no GQA in a fused layout: qf == kvf)
            width = site.n_heads * site.head_dim
            set_module(base, site.q, slice_out(get_module(base, site.q), torch.cat([qf, width + kvf, 2 * width + kvf])))
        else:
            set_module(base, site.q, slice_out(get_module(base, site.q), qf))
            set_module(base, site.k, slice_out(get_module(base, site.k), kvf))
            set_module(base, site.v, slice_out(get_module(base, site.v), kvf))
        set_module(base, site.o, slice_in(get_module(base, site.o), qf))
        n = len(units) * site.group
        sizes = {"num_attention_heads": n, "all_head_size": n * site.head_dim, "n_heads": n, "num_heads": n,
                 "split_size": n * site.head_dim}
        for name in lay.fields:
            setattr(attn, name, sizes[name])
        if base.config.model_type == "mpnet":
            select_position_bias(attn, units)  # group 1: units are heads
    return model


def select_position_bias(attn: nn.Module, heads: Sequence[int]) -> None:
    """An MPNet self-attention that now keeps only `heads` (numbered as the layer was before this cut) reads
    only their rows of the shared relative position bias; a layer cut before composes with its `head_index`."""
    dev = next(attn.parameters()).device
    heads = torch.as_tensor([int(h) for h in heads], dtype=torch.long, device=dev)
    if getattr(attn, "head_index", None) is not None:
        attn.head_index = attn.head_index[heads]  # pruned before: ids of the original heads
    else:
        attn.__class__ = _head_indexed(type(attn))
        attn.register_buffer("head_index", heads)


def check_head_indices(model: nn.Module) -> None:
    """Raise a ValueError unless every `head_index` buffer (MPNet, read from a file) holds distinct ids of
    the config's heads, as many as its layer has heads."""
    base = base_model(model)
    n_cfg = config_heads(base.config)[0]
    for site in attention_sites(model):
        idx = getattr(get_module(base, site.attn), "head_index", None)
        if idx is None:
            continue
        ids = idx.tolist()
        if len(ids) != site.n_heads or len(set(ids)) != len(ids) or any(not 0 <= i < n_cfg for i in ids):
            raise ValueError(f"layer {site.layer}: head_index {ids[:8]} is not {site.n_heads} distinct ids "
                             f"in [0, {n_cfg})")


def resize_heads(model: nn.Module, counts: Sequence[int]) -> nn.Module:
    """Give each layer's attention the given number of head units (its first ones), before a state dict is
    loaded into it (MPNet's `head_index` buffers then come from the state dict)."""
    full = head_counts(model)
    if len(counts) != len(full) or any(not 0 <= c <= f for c, f in zip(counts, full)):
        raise ValueError(f"head counts {list(counts)[:4]}... do not fit the model's {full[:4]}...")
    return keep_heads(model, [range(c) for c in counts])
