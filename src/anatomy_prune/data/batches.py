"""Tokenised batches: padded to the longest in the batch, truncated to max_length."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..errors import UserError


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
            labels: Sequence[int] | None = None) -> Iterator[dict]:
    """Tokenised batches (padded to the longest in the batch, truncated to max_length)."""
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[i:i + batch_size], dtype=torch.float32)
        yield batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
