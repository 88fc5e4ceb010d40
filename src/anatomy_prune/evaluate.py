"""Evaluation: accuracy and wall-clock inference time, perplexity, parameter and FLOP counts."""
from __future__ import annotations

import math
import platform
import time
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TextSet, batches, check_max_length, to_device
from .errors import UserError
from .families import Conv1D, base_model, ffn_widths, in_features, out_features
from .models import Loaded


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, seq_len: int = 128) -> int:
    """Forward FLOPs per token of the transformer blocks and heads: 2 * in * out for every Linear / Conv1D
    applied to each token, plus attention's scores and weighted sum (4 * seq_len * d_model per layer).
    Embedding lookups are free; a decoder's LM head counts (it is a Linear)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) or (Conv1D and isinstance(mod, Conv1D)):
            total += 2 * in_features(mod) * out_features(mod)
    cfg = base_model(model).config
    total += 4 * seq_len * cfg.hidden_size * len(ffn_widths(model))
    return int(total)


def ffn_flops_per_token(model: nn.Module) -> int:
    """FLOPs per token of the FFNs alone (what FFN pruning removes)."""
    from .families import ffn_sites, get_module
    base = base_model(model)
    total = 0
    for site in ffn_sites(model):
        for path in site.up + (site.down,):
            mod = get_module(base, path)
            total += 2 * in_features(mod) * out_features(mod)
    return int(total)


def runtime_info(device: torch.device) -> dict:
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate_classifier(loaded: Loaded, data: TextSet, batch_size: int = 32, max_length: int = 256,
                        progress: bool = True) -> dict:
    """Accuracy and wall-clock time of the forward passes over `data` (tokenisation done beforehand)."""
    if loaded.kind != "classifier":
        raise UserError(f"model '{loaded.spec}' has no classification head; fine-tune it first: "
                        f"anatomy-prune finetune --model {loaded.spec}")
    if len(data) == 0:
        raise UserError("the evaluation set is empty")
    check_max_length(loaded.tokenizer, max_length, loaded.max_positions)
    model, device = loaded.model.eval(), loaded.device
    enc = [to_device(b, device) for b in batches(loaded.tokenizer, data.texts, batch_size, max_length)]
    with torch.inference_mode():  # warm-up on one batch so lazy initialisation is not timed
        model(input_ids=enc[0]["input_ids"], attention_mask=enc[0]["attention_mask"])
    preds = []
    _sync(device)
    start = time.perf_counter()
    for b in tqdm(enc, desc="evaluate", disable=not progress, leave=False):
        preds.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) > 0)
    _sync(device)
    latency = time.perf_counter() - start
    pred = torch.cat(preds).long().cpu()
    acc = (pred == torch.tensor(data.labels)).float().mean().item()
    return {"accuracy": acc, "latency_s": latency, "n_eval": len(data), "batch_size": batch_size,
            "max_length": max_length, **runtime_info(device)}


@torch.inference_mode()
def perplexity(loaded: Loaded, texts: Sequence[str], max_length: int = 256, batch_size: int = 8,
               progress: bool = True) -> dict:
    """Perplexity of a causal LM on `texts`: the texts are joined (EOS between) and cut into
    non-overlapping blocks of max_length tokens; every token after the first of a block is scored."""
    if loaded.kind != "causal-lm":
        raise UserError(f"perplexity needs a causal language model; '{loaded.spec}' is a {loaded.kind}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no text to compute perplexity on")
    check_max_length(loaded.tokenizer, max_length, loaded.max_positions)
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
        logits = loaded.model(input_ids=x).logits[:, :-1].float()  # [batch, pos-1, vocab]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "n_tokens": count, "n_blocks": n_blocks,
            "max_length": max_length, "latency_s": time.perf_counter() - start, **runtime_info(device)}


def size_report(loaded: Loaded, seq_len: int = 128) -> dict:
    widths = ffn_widths(loaded.model)
    return {"params": count_params(loaded.model), "ffn_widths": widths, "ffn_neurons": sum(widths),
            "flops_per_token": flops_per_token(loaded.model, seq_len),
            "ffn_flops_per_token": ffn_flops_per_token(loaded.model), "flops_seq_len": seq_len}
