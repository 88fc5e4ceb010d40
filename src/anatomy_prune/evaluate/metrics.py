"""Metrics: accuracy of a classifier and perplexity of a causal LM, each with the wall-clock time of the
forward passes; `evaluate` dispatches by the model's kind."""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import batches, to_device
from ..data.reviews import TextSet
from ..errors import UserError
from ..models.loading import Loaded, max_length_for
from .stats import classification_report
from .timing import runtime_info, sync


@torch.inference_mode()
def evaluate_classifier(loaded: Loaded, data: TextSet, batch_size: int = 32, max_length: int | None = None,
                        progress: bool = True) -> dict:
    """Accuracy and wall-clock time of the forward passes over `data` (tokenisation done beforehand)."""
    if loaded.kind != "classifier":
        raise UserError(f"model '{loaded.spec}' has no classification head; fine-tune it first: "
                        f"anatomy-prune finetune --model {loaded.spec}")
    if len(data) == 0:
        raise UserError("the evaluation set is empty")
    max_length = max_length_for(loaded, max_length)
    model, device = loaded.model.eval(), loaded.device
    enc = [to_device(b, device) for b in batches(loaded.tokenizer, data.texts, batch_size, max_length)]
    with torch.inference_mode(), loaded.autocast():  # warm-up on one batch so lazy initialisation is not timed
        model(input_ids=enc[0]["input_ids"], attention_mask=enc[0]["attention_mask"])
    logits = []
    sync(device)
    start = time.perf_counter()
    with loaded.autocast():
        for b in tqdm(enc, desc="evaluate", disable=not progress, leave=False):
            logits.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).float())
    sync(device)
    latency = time.perf_counter() - start
    scores = torch.cat(logits).float().cpu()
    report = classification_report(data.labels, scores.tolist())
    pred = (scores > 0).long()
    # accuracy as before (float32 mean), so numbers match across versions; the report adds the rest
    acc = (pred == torch.tensor(data.labels)).float().mean().item()
    correct = (pred == torch.tensor(data.labels)).int().tolist()
    return {**report, "accuracy": acc, "latency_s": latency, "n_eval": len(data), "batch_size": batch_size,
            "max_length": max_length, "correct": correct, "dtype": loaded.dtype, **runtime_info(device)}


@torch.inference_mode()
def perplexity(loaded: Loaded, texts: Sequence[str], max_length: int | None = None, batch_size: int = 8,
               progress: bool = True) -> dict:
    """Perplexity of a causal LM on `texts`: the texts are joined (EOS between) and cut into
    non-overlapping blocks of max_length tokens; every token after the first of a block is scored."""
    if loaded.kind != "causal-lm":
        raise UserError(f"perplexity needs a causal language model; '{loaded.spec}' is a {loaded.kind}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no text to compute perplexity on")
    max_length = max_length_for(loaded, max_length)
    tok = loaded.tokenizer
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    n_blocks = len(ids) // max_length
    if n_blocks == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one block of {max_length}")
    blocks = torch.tensor(ids[: n_blocks * max_length]).view(n_blocks, max_length)
    device, nll, count = loaded.device, 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, n_blocks, batch_size), desc="perplexity", disable=not progress, leave=False):
        x = blocks[i:i + batch_size].to(device)
        with loaded.autocast():
            logits = loaded.model(input_ids=x).logits[:, :-1].float()  # [batch, pos-1, vocab]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "n_tokens": count, "n_blocks": n_blocks,
            "max_length": max_length, "latency_s": time.perf_counter() - start, **runtime_info(device)}




def evaluate(loaded: Loaded, data: TextSet, batch_size: int = 32, max_length: int | None = None,
             progress: bool = True) -> dict:
    """Accuracy (classifier) or perplexity (causal LM) with latency; `n_eval` texts either way.
    max_length: models.max_length_for's rule (as given, else the fine-tune's, else 256)."""
    length = max_length_for(loaded, max_length)
    if loaded.kind == "classifier":
        return evaluate_classifier(loaded, data, batch_size, length, progress=progress)
    if loaded.kind != "causal-lm":
        raise UserError(f"model '{loaded.spec}' has no classification head and is not a causal LM, so it cannot be "
                        f"evaluated; fine-tune it first: anatomy-prune finetune --model {loaded.spec}")
    out = perplexity(loaded, data.texts, max_length=length, batch_size=max(1, batch_size // 4), progress=progress)
    out["n_eval"] = len(data)
    return out


def metric_name(kind: str) -> str:
    return "accuracy" if kind == "classifier" else "perplexity"


def evaluation_set(loaded: Loaded, data: str = "imdb", eval_size: int | None = 1000, split: str = "test") -> TextSet:
    """What a model is evaluated on: the first eval_size reviews of a named split (test, or heldout for
    larger comparisons) for a classifier (a user file: its first eval_size rows), held-out text (labels -1)
    for a causal LM's perplexity."""
    from ..data.splits import eval_set
    from ..data.texts import lm_texts

    if eval_size is not None and (isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size <= 0):
        raise UserError(f"--eval-size must be a positive whole number, got {eval_size}")
    if loaded.kind == "classifier":
        return eval_set(data, eval_size, split)
    if loaded.kind == "causal-lm":
        texts = eval_set(data, eval_size, split).texts if data in ("imdb", "hf") else lm_texts(data, eval_size)
        return TextSet(texts, [-1] * len(texts))
    raise UserError(f"model '{loaded.spec}' has no classification head and is not a causal LM, so it cannot be "
                    f"evaluated; fine-tune it first: anatomy-prune finetune --model {loaded.spec}")
