"""Capture what modules see or produce during forward passes; hooks are always removed afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from torch import Tensor, nn

from .families import base_model, ffn_sites, get_module


@contextmanager
def capture(root: nn.Module, paths: Sequence[str], inputs: bool = False,
            reduce: Callable[[Tensor], Tensor] | None = None) -> Iterator[dict[str, list[Tensor]]]:
    """Record each named module's output (or first input) on every forward pass.

    `reduce` maps the captured tensor before it is kept (e.g. to a per-neuron sum) so long runs stay small.
    """
    store: dict[str, list[Tensor]] = {p: [] for p in paths}
    handles = []
    for path in paths:
        mod = get_module(root, path)
        if inputs:
            def pre(_m, args, path=path):
                x = args[0].detach()
                store[path].append(reduce(x) if reduce else x)
            handles.append(mod.register_forward_pre_hook(pre))
        else:
            def post(_m, _args, out, path=path):
                x = (out[0] if isinstance(out, tuple) else out).detach()
                store[path].append(reduce(x) if reduce else x)
            handles.append(mod.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_ffn_activations(model: nn.Module, reduce: Callable[[Tensor], Tensor] | None = None
                            ) -> Iterator[list[list[Tensor]]]:
    """Per layer, the FFN's hidden activations as the down projection receives them: [batch, pos, d_ff]
    each (or `reduce` of it). Yields a list indexed by layer, filled as forward passes run."""
    sites = ffn_sites(model)
    with capture(base_model(model), [s.down for s in sites], inputs=True, reduce=reduce) as store:
        yield [store[s.down] for s in sites]
