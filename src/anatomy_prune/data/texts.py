"""Unlabelled inputs: the paper's probes, text files (one input per line), `--inputs` specs and held-out
text for perplexity."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..resources import packaged
from .reviews import read_texts
from .splits import eval_set


def load_probes() -> list[dict]:
    """The ten probe sentences of the first paper's Table 1: [{id, subtask, text}]."""
    return json.loads(packaged("data", "probes.json").read_text(encoding="utf-8"))["probes"]


def resolve_inputs(inputs: str = "probes") -> tuple[list[str], list[str]]:
    """`probes`, `imdb:N` / `hf:N` (N test reviews of the embedded or the hub's IMDB) or a text file ->
    (texts, names)."""
    if inputs == "probes":
        probes = load_probes()
        return [p["text"] for p in probes], [f"{p['id']}: {p['subtask']}" for p in probes]
    if inputs.startswith(("imdb:", "hf:")):
        try:
            n = int(inputs.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--inputs '{inputs}': write imdb:N (or hf:N) with N a positive number") from None
        if n <= 0:
            raise UserError(f"--inputs '{inputs}': N must be positive")
        test = eval_set(inputs.split(":", 1)[0], n)
        return test.texts, [f"review {i} ({'pos' if y else 'neg'})" for i, y in enumerate(test.labels)]
    texts = read_texts(inputs)
    return texts, [f"line {i + 1}" for i in range(len(texts))]


def lm_texts(source: str = "imdb", n: int = 200) -> list[str]:
    """Held-out text for perplexity: IMDB test reviews (the named test split), a text file, or wikitext (hub)."""
    if source in ("imdb", "hf"):
        return eval_set(source, n).texts
    if source == "wikitext":  # pragma: no cover - needs the network
        try:
            from datasets import load_dataset
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as exc:
            raise UserError(f"could not load wikitext ({type(exc).__name__}); offline, use imdb or a text file") from None
        return [t for t in ds["text"] if t.strip()][:n]
    return read_texts(source)[:n]


