"""Named hook points, in the spirit of TransformerLens: `run_with_hooks` installs functions at named places of a
model for the duration of a `with` block, `run_with_cache` folds what they receive into a cache; both always
remove their hooks.

Hook points (i = block index, counted from 0):
  ffn.{i}.hidden     what block i's down projection receives: the FFN's hidden activation  # [batch, pos, d_ff]
  attn.{i}.heads     what block i's attention output projection receives: the per-head context, heads
                     concatenated (head h is [..., h*head_dim:(h+1)*head_dim])   # [batch, pos, heads*head_dim]
  final_norm.input   what a decoder's final norm (ln_f / norm) receives                    # [batch, pos, d_model]
  model.input        the keyword arguments of the base model's forward (input_ids, attention_mask, ...)

A hook function is called as fn(x, point) and returns None (it only observes) or a tensor that replaces x
(it edits: masking, scaling). Hooks at the same point run in the order they were installed, so an outer
`run_with_hooks` block observes what an inner one then edits.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from .models.families import attention_sites, base_model, ffn_sites, get_module

HookFn = Callable[[Tensor, str], Tensor | None]
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm")  # decoders' norm after the last block, by attribute name


def ffn_hidden(layer: int) -> str:
    return f"ffn.{layer}.hidden"


def attn_heads(layer: int) -> str:
    return f"attn.{layer}.heads"


def final_norm_name(model: nn.Module) -> str | None:
    """Attribute name of the norm applied after the last block (decoders), or None (BERT-like encoders)."""
    base = base_model(model)
    for name in FINAL_NORMS:
        if isinstance(getattr(base, name, None), nn.Module):
            return name
    return None


def hook_points(model: nn.Module) -> dict[str, nn.Module]:
    """Every hook point of `model` and the module whose input it is."""
    base = base_model(model)
    points = {ffn_hidden(s.layer): get_module(base, s.down) for s in ffn_sites(model)}
    points.update({attn_heads(s.layer): get_module(base, s.o) for s in attention_sites(model)})
    norm = final_norm_name(model)
    if norm:
        points["final_norm.input"] = getattr(base, norm)
    points["model.input"] = base
    return points


@contextmanager
def run_with_hooks(model: nn.Module, hooks: Mapping[str, HookFn | Sequence[HookFn]]) -> Iterator[None]:
    """Install `hooks` (point name -> function, or a list of them) while inside; always removed after.
    `ffn.*.hidden` installs the function on every block's FFN, `attn.*.heads` on every block's attention."""
    points = hook_points(model)
    expanded: list[tuple[str, HookFn]] = []
    for name, fns in hooks.items():
        fns = [fns] if callable(fns) else list(fns)
        if name in ("ffn.*.hidden", "attn.*.heads"):
            head, _, tail = name.partition(".*")
            names = [p for p in points if p.startswith(head + ".") and p.endswith(tail)]
        else:
            names = [name]
        for n in names:
            if n not in points:
                raise KeyError(f"no hook point '{n}' in this model; it has {sorted(points)[:4]}...")
            expanded += [(n, fn) for fn in fns]
    handles = []
    try:
        for name, fn in expanded:
            mod = points[name]
            if name == "model.input":
                def pre_kw(_m, args, kwargs, fn=fn, name=name):
                    fn(kwargs, name)  # observe only: the arguments are not replaced
                handles.append(mod.register_forward_pre_hook(pre_kw, with_kwargs=True))
            else:
                def pre(_m, args, fn=fn, name=name):
                    out = fn(args[0], name)
                    return None if out is None else (out,) + tuple(args[1:])
                handles.append(mod.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()


def layer_of(point: str) -> int:
    """The block index of an `ffn.{i}.hidden` or `attn.{i}.heads` point."""
    return int(point.split(".")[1])


Reduce = Callable[[object, Tensor, str], object]


@contextmanager
def run_with_cache(model: nn.Module, names: str | Sequence[str], reduce: Reduce) -> Iterator[dict[str, object]]:
    """Fold what the named points receive into a cache while inside: cache[point] = reduce(cache.get(point),
    x, point), x detached; hooks always removed after. Patterns as in run_with_hooks. Yields the cache."""
    cache: dict[str, object] = {}

    def fold(x: Tensor, point: str) -> None:
        cache[point] = reduce(cache.get(point), x.detach(), point)

    with run_with_hooks(model, {name: fold for name in ([names] if isinstance(names, str) else names)}):
        yield cache


def per_layer(cache: Mapping[str, object], point: Callable[[int], str], n_layers: int) -> list:
    """A cache's values of layers 0..n_layers-1 in order (None where a layer's point never ran)."""
    return [cache.get(point(i)) for i in range(n_layers)]
