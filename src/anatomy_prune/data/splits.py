"""Splits: shuffle by seed, then take test first, validation next and train from the rest; the evaluation
set; the calibration sample."""
from __future__ import annotations

import random
from typing import Sequence

from ..errors import UserError
from .reviews import Splits, TextSet, read_imdb_hub, read_imdb_offline, read_labelled_file, read_texts

DEFAULT_SIZES = (20_000, 4_000, 1_000)  # train / validation / test, as in the paper
CALIB_SIZE = 256  # reviews: enough for stable means, small enough for memory and time on a CPU


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
    if eval_size is not None and (isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size <= 0):
        raise UserError(f"--eval-size must be a positive whole number, got {eval_size}")
    if data in ("imdb", "hf"):
        n = DEFAULT_SIZES[2] if eval_size is None else eval_size
        return load_splits(data, (0, 0, n), seed).test
    full = read_labelled_file(data)
    return full.head(eval_size)




def calibration_set(n: int = CALIB_SIZE, seed: int = 0, source: str = "imdb",
                    exclude: Sequence[str] = ()) -> TextSet:
    """`n` calibration texts: a seeded sample of IMDB training-split reviews (with labels), or the first
    lines of a text file (labels unknown, set to -1). Texts in `exclude` (the evaluation set) are left out."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"--calib-size must be a positive whole number, got {n}")
    banned = set(exclude)
    if source == "imdb":
        train = load_splits("imdb", DEFAULT_SIZES, seed=0).train
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        ids = [i for i in order if train.texts[i] not in banned][:n]
        if len(ids) < n:
            raise UserError(f"--calib-size {n} is above the {len(ids)} training reviews available")
        return TextSet([train.texts[i] for i in ids], [train.labels[i] for i in ids])
    texts = [t for t in read_texts(source) if t not in banned][:n]
    if not texts:
        raise UserError(f"calibration file '{source}' has no text outside the evaluation set; give other texts")
    return TextSet(texts, [-1] * len(texts))
