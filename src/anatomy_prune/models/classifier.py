"""The paper's binary classifier: backbone -> readout token -> dropout -> dense -> sigmoid."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .families import base_model, family_of, gather_readout, readout_index


class BinaryClassifier(nn.Module):
    """A transformer backbone (a decoder's LM head dropped) with one binary output on its readout token.

    forward() returns the logit (before the sigmoid), one per input: [batch].
    """

    def __init__(self, backbone: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.backbone = base_model(backbone)
        hidden = self.backbone.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, 1)
        self.family = family_of(self.backbone)

    @property
    def config(self):
        return self.backbone.config

    def readout(self, input_ids: Tensor, attention_mask: Tensor, **kw) -> Tensor:
        """The readout token's final hidden state: [batch, d_model]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return gather_readout(hidden, readout_index(self.family, attention_mask))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kw) -> Tensor:
        return self.dense(self.dropout(self.readout(input_ids, attention_mask, **kw))).squeeze(-1)  # [batch]

