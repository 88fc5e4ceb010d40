"""Anatomy of layers and FFN neurons (the first paper's sections 3.1-3.3).

Layer similarity: cosine between the readout token (CLS, or the last real token) at every layer
(0 = embeddings ... L = last block) and the readout token of the last layer.
Neuron similarity: cosine between each FFN neuron's output vector (what it adds to the residual stream per
unit of activation: a column of the down projection) and the last layer's readout token for that input.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .data import batches, to_device
from .families import base_model, ffn_sites, gather_readout, neuron_output_vectors, readout_index
from .models import Loaded


@torch.no_grad()
def readout_states(loaded: Loaded, texts: Sequence[str], max_length: int = 128, batch_size: int = 16) -> Tensor:
    """The readout token's hidden state after the embeddings and after every block: [n_inputs, L+1, d_model]."""
    base = base_model(loaded.model)
    out = []
    for b in batches(loaded.tokenizer, texts, batch_size, max_length):
        b = to_device(b, loaded.device)
        hidden = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      output_hidden_states=True).hidden_states  # L+1 x [batch, pos, d]
        idx = readout_index(loaded.family, b["attention_mask"])
        out.append(torch.stack([gather_readout(h, idx) for h in hidden], dim=1).float().cpu())
    return torch.cat(out)


def layer_similarity(states: Tensor) -> Tensor:
    """Cosine of each layer's readout state with the last layer's: [n_inputs, L+1] (last column is 1)."""
    return F.cosine_similarity(states, states[:, -1:, :].expand_as(states), dim=-1)


@torch.no_grad()
def neuron_similarity(loaded: Loaded, final: Tensor) -> list[Tensor]:
    """Per layer, cosine of every neuron's output vector with each input's final readout state.

    final: [n_inputs, d_model] -> list over layers of [n_inputs, d_ff].
    """
    sims = []
    for site in ffn_sites(loaded.model):
        vecs = neuron_output_vectors(loaded.model, site).detach().float().cpu()  # [d_ff, d_model]
        sims.append(F.normalize(final.float(), dim=-1) @ F.normalize(vecs, dim=-1).t())
    return sims
