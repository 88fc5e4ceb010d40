"""Training tasks shared by fine-tuning and fine-pruning: which batch a step sees and its loss.

ClassifyTask: binary classification of labelled texts, BCE on the classifier's readout logit.
LMTask: causal-LM loss on non-overlapping blocks of max_length tokens of training text.
The order of examples: seeded shuffles of the whole set, one epoch after another, so a run of any length
sees every example once before any twice.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor, nn

from ..data.batches import batches, to_device
from ..data.reviews import TextSet
from ..errors import UserError
from ..models.loading import Loaded


def epoch_order(n: int, total: int, seed: int) -> list[int]:
    """`total` indices into range(n): seeded shuffles of the whole range, one after another."""
    rng, order = random.Random(seed), []
    while len(order) < total:
        ids = list(range(n))
        rng.shuffle(ids)
        order.extend(ids)
    return order[:total]


def lm_blocks(tokenizer, texts: Sequence[str], length: int) -> Tensor:
    """Texts joined with EOS and cut into non-overlapping blocks: [n_blocks, length] (the tail dropped)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // length
    return torch.tensor(ids[:n * length], dtype=torch.long).view(n, length)


class ClassifyTask:
    """Batches of labelled texts for a classifier; `total` examples in all, `batch_size` per step (the
    last step takes what is left)."""

    name, metric = "imdb", "accuracy"

    def __init__(self, loaded: Loaded, train: TextSet, batch_size: int, max_length: int, total: int, seed: int):
        if loaded.kind != "classifier":
            raise UserError(f"a classification task needs a classifier; '{loaded.spec}' is a {loaded.kind}")
        if len(set(train.labels)) < 2:
            raise UserError("the training split has a single class; give more data or another seed")
        self.loaded, self.train, self.batch_size, self.max_length = loaded, train, batch_size, max_length
        self.order = epoch_order(len(train), total, seed)
        self.steps = (len(self.order) + batch_size - 1) // batch_size
        self.loss_fn = nn.BCEWithLogitsLoss()

    def encode(self, ids: Sequence[int], data: TextSet | None = None) -> dict:
        data = self.train if data is None else data
        b = next(batches(self.loaded.tokenizer, [data.texts[i] for i in ids], len(ids), self.max_length,
                         [data.labels[i] for i in ids]))
        return to_device(b, self.loaded.device)

    def batch(self, step: int) -> dict:
        return self.encode(self.order[step * self.batch_size:(step + 1) * self.batch_size])

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # [batch]

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        return self.loss_fn(self.outputs(model, batch), batch["labels"])

    def analysis_batches(self, n: int) -> list[dict]:
        """The first n training examples in batches (for sensitivity and uniqueness)."""
        n = min(n, len(self.train))
        return [self.encode(list(range(i, min(i + self.batch_size, n)))) for i in range(0, n, self.batch_size)]


class LMTask:
    """Blocks of training text for a causal LM; `steps` x `batch_size` blocks in all."""

    name, metric = "lm", "perplexity"

    def __init__(self, loaded: Loaded, texts: Sequence[str], batch_size: int, max_length: int, steps: int,
                 seed: int):
        if loaded.kind != "causal-lm":
            raise UserError(f"--task lm needs a causal language model; '{loaded.spec}' is a {loaded.kind}, "
                            "use --task imdb")
        self.loaded, self.batch_size, self.max_length, self.steps = loaded, batch_size, max_length, steps
        self.blocks = lm_blocks(loaded.tokenizer, texts, max_length)  # [n_blocks, max_length]
        if self.blocks.shape[0] == 0:
            raise UserError(f"the training text has fewer than {max_length} tokens; give more text "
                            "or a smaller --max-length")
        self.order = epoch_order(self.blocks.shape[0], steps * batch_size, seed)

    def batch(self, step: int) -> dict:
        b = self.batch_size
        return {"input_ids": self.blocks[self.order[step * b:(step + 1) * b]].to(self.loaded.device)}

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"]).logits

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def analysis_batches(self, n: int) -> list[dict]:
        n, b = min(n, self.blocks.shape[0]), self.batch_size
        return [{"input_ids": self.blocks[i:min(i + b, n)].to(self.loaded.device)} for i in range(0, n, b)]
