"""One block at a time: slice one block's FFN physically, with the down projection's kept columns as the
one compensation (`apply.compensate.compensate_layer`) made them. The all-at-once
`apply.modes.physical` takes a whole-model plan; a layer-wise pass (pipeline.layerwise) has only the block in
hand, so this uses the same slicing primitives (`models.surgery.slice_out` / `slice_in`) for one layer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.families import base_model, ffn_sites, get_module, set_module, weight_out_in
from ..models.surgery import make_projection, slice_in, slice_out


def slice_block_ffn(model: nn.Module, layer: int, keep: list[int], down_weight: Tensor | None = None,
                    down_bias: Tensor | None = None) -> None:
    """Keep only the listed neurons of block `layer`'s FFN, in place (models.surgery.keep_ffn_neurons for one
    block; the config's widths are the caller's to set once every block is done). down_weight [d_model, |K|]
    (and down_bias): the kept columns of the down projection as compensate_layer made them, used instead of
    slicing the old ones."""
    base = base_model(model)
    site = ffn_sites(model)[layer]
    down = get_module(base, site.down)
    dev = weight_out_in(down).device
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=dev)
    for path in site.up:
        set_module(base, path, slice_out(get_module(base, path), idx))
    if down_weight is None:
        set_module(base, site.down, slice_in(down, idx))
    else:
        if tuple(down_weight.shape) != (weight_out_in(down).shape[0], len(keep)):
            raise ValueError(f"block {layer}: a down weight of shape {tuple(down_weight.shape)} for {len(keep)} neurons")
        bias = down_bias if down_bias is not None else (down.bias.detach() if getattr(down, "bias", None) is not None
                                                        else None)
        set_module(base, site.down, make_projection(down, down_weight.detach().contiguous(), bias))
