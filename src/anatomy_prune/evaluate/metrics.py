"""Metrics: accuracy of a classifier and perplexity of a causal LM, each with the wall-clock time of the
forward passes; `evaluate` dispatches by the model's kind."""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.batches import batches, to_device
from ..data.reviews import TextSet
from ..errors import UserError
from ..models.loading import Loaded, max_length_for
from ..progress import tqdm
from ..validate import optional, positive_int
from .stats import check_level, classification_report
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
               progress: bool = True, level: float = 0.95, n_boot: int = 2000) -> dict:
    """Perplexity of a causal LM on `texts`: the texts are joined (EOS between) and cut into
    non-overlapping blocks of max_length tokens; every token after the first of a block is scored. Each
    scored token's loss is also credited to the text it belongs to (`text_nll`, `text_tokens`), so the
    perplexity carries a bootstrap interval over texts (`perplexity_interval`) and two models on the same
    texts can be compared pairwise (`paired_perplexity`)."""
    if loaded.kind != "causal-lm":
        raise UserError(f"perplexity needs a causal language model; '{loaded.spec}' is a {loaded.kind}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no text to compute perplexity on")
    max_length = max_length_for(loaded, max_length)
    tok = loaded.tokenizer
    ids: list[int] = []
    owner: list[int] = []   # owner[k]: the text token k belongs to (its closing EOS included)
    for i, t in enumerate(texts):
        piece = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.extend(piece)
        owner.extend([i] * len(piece))
    n_blocks = len(ids) // max_length
    if n_blocks == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one block of {max_length}")
    blocks = torch.tensor(ids[: n_blocks * max_length]).view(n_blocks, max_length)     # [n_blocks, pos]
    owners = torch.tensor(owner[: n_blocks * max_length]).view(n_blocks, max_length)   # [n_blocks, pos]
    text_nll = torch.zeros(len(texts), dtype=torch.float64)
    text_tokens = torch.zeros(len(texts), dtype=torch.long)
    device, nll, count = loaded.device, 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(0, n_blocks, batch_size), desc="perplexity", disable=not progress, leave=False):
        x = blocks[i:i + batch_size].to(device)
        with loaded.autocast():
            logits = loaded.model(input_ids=x).logits[:, :-1].float()  # [batch, pos-1, vocab]
        flat_logits, targets = logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        loss = nn.functional.cross_entropy(flat_logits, targets, reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
        per_token = nn.functional.cross_entropy(flat_logits, targets, reduction="none").double().cpu()  # [batch*(pos-1)]
        who = owners[i:i + batch_size, 1:].reshape(-1)                                                  # [batch*(pos-1)]
        text_nll.index_add_(0, who, per_token)
        text_tokens.index_add_(0, who, torch.ones_like(who))
    scored = text_tokens > 0   # texts in the dropped tail have no scored token
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "n_tokens": count, "n_blocks": n_blocks,
           "max_length": max_length, "latency_s": time.perf_counter() - start, **runtime_info(device),
           "text_nll": text_nll[scored].tolist(), "text_tokens": text_tokens[scored].tolist()}
    out["perplexity_interval"] = list(perplexity_interval(out["text_nll"], out["text_tokens"], level, n_boot))
    return out


def _resampled_means(nll: np.ndarray, tokens: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Token-weighted mean loss of `n_boot` resamples of the texts (with replacement): [n_boot]."""
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(n_boot, nll.size))  # [n_boot, n_texts]
    return nll[idx].sum(axis=1) / tokens[idx].sum(axis=1)


def perplexity_interval(text_nll: Sequence[float], text_tokens: Sequence[int], level: float = 0.95,
                        n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a perplexity, resampling texts; each resample's perplexity is
    exp(total loss / total tokens), so long texts weigh by their tokens, as in the point estimate."""
    nll, tokens = np.asarray(text_nll, dtype=float), np.asarray(text_tokens, dtype=float)
    if nll.size == 0 or nll.shape != tokens.shape:
        raise ValueError("a perplexity interval needs per-text losses and token counts of equal, non-zero length")
    level = check_level(level)
    lo, hi = np.quantile(_resampled_means(nll, tokens, n_boot, seed), [(1 - level) / 2, (1 + level) / 2])
    return float(math.exp(lo)), float(math.exp(hi))


def paired_perplexity(a: dict, b: dict, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Model A against model B on the same texts (two `perplexity` results): the ratio ppl_A / ppl_B with a
    paired bootstrap interval (the same resampled texts for both) and a two-sided bootstrap p-value of
    "no difference" (twice the smaller share of resampled log-ratios on either side of 0)."""
    ta, tb = np.asarray(a["text_tokens"], dtype=float), np.asarray(b["text_tokens"], dtype=float)
    if ta.shape != tb.shape or not np.array_equal(ta, tb):
        raise UserError("a paired perplexity comparison needs both models scored on the same texts and blocks")
    diff = np.asarray(a["text_nll"], dtype=float) - np.asarray(b["text_nll"], dtype=float)   # [n_texts]
    level = check_level(level)
    means = _resampled_means(diff, ta, n_boot, seed)                                          # [n_boot]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"ratio": math.exp(diff.sum() / ta.sum()), "low": math.exp(lo), "high": math.exp(hi),
            "p_value": max(p, 1.0 / n_boot), "n_texts": int(ta.size), "level": level}


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

    optional(positive_int, eval_size, "--eval-size")
    if loaded.kind == "classifier":
        return eval_set(data, eval_size, split)
    if loaded.kind == "causal-lm":
        texts = eval_set(data, eval_size, split).texts if data in ("imdb", "hf") else lm_texts(data, eval_size)
        return TextSet(texts, [-1] * len(texts))
    raise UserError(f"model '{loaded.spec}' has no classification head and is not a causal LM, so it cannot be "
                    f"evaluated; fine-tune it first: anatomy-prune finetune --model {loaded.spec}")
