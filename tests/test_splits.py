"""Clean splits: texts are deduplicated before splitting, every task draws from its own named split, and
the splits are disjoint; on a synthetic set with planted duplicates (fast) and on the real IMDB (slow)."""
from __future__ import annotations

import pytest

import anatomy_prune.data.splits as splits
from anatomy_prune import UserError
from anatomy_prune.data.reviews import TextSet


def synthetic(n: int, dup_every: int = 7) -> TextSet:
    texts = [f"review number {i}" for i in range(n)]
    texts += [texts[i] for i in range(0, n, dup_every)]   # planted repeats, as IMDB has
    return TextSet(texts, [i % 2 for i in range(len(texts))])


@pytest.fixture
def fake_imdb(monkeypatch):
    data = synthetic(24_902)
    monkeypatch.setattr(splits, "read_imdb_offline", lambda: data)
    splits.named_splits.cache_clear()
    yield data
    splits.named_splits.cache_clear()


def test_dedup_keeps_first_occurrences():
    d, dropped = splits.dedup(synthetic(100, 10))
    assert dropped == 10 and len(d) == 100 and len(set(d.texts)) == 100


def test_named_splits_are_disjoint_and_sized(fake_imdb):
    ns = splits.named_splits("imdb")
    assert ns.dropped_duplicates == len(fake_imdb) - 24_902
    sizes = ns.sizes()
    assert sizes == {"test": 1000, "validation": 1000, "heldout": 5000, "calibration": 2000, "train": 15_902}
    seen: set[str] = set()
    for name in splits.SPLIT_NAMES:
        texts = set(ns[name].texts)
        assert len(texts) == len(ns[name]) and not texts & seen, name
        seen |= texts
    assert len(seen) == 24_902


def test_every_task_draws_from_its_own_split(fake_imdb):
    ns = splits.named_splits("imdb")
    calib = splits.calibration_set(256, seed=3)
    assert set(calib.texts) <= set(ns["calibration"].texts)
    assert splits.calibration_set(256, seed=3).texts == calib.texts             # pinned by its seed
    assert splits.calibration_set(256, seed=4).texts != calib.texts
    assert splits.eval_set("imdb", 1000).texts == ns["test"].texts
    assert splits.eval_set("imdb", 5000, "heldout").texts == ns["heldout"].texts
    ft = splits.load_splits("imdb", (4000, 500, 1000), seed=7)                  # the fine-tune's
    assert set(ft.train.texts) <= set(ns["train"].texts) and set(ft.validation.texts) <= set(ns["validation"].texts)
    assert ft.test.texts == ns["test"].texts
    # a training seed never moves the test reviews
    assert splits.load_splits("imdb", (4000, 500, 1000), seed=1).test.texts == ft.test.texts


def test_asking_more_than_a_split_holds_is_one_line(fake_imdb):
    with pytest.raises(UserError, match="holds 15902 after deduplication"):
        splits.load_splits("imdb", (20_000, 500, 1000))
    with pytest.raises(UserError, match="holds 5000"):
        splits.eval_set("imdb", 6000, "heldout")
    with pytest.raises(UserError, match="unknown split"):
        splits.take("imdb", "nope")


def test_a_user_file_is_deduplicated_before_splitting(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["text,label"] + [f"text {i % 30},{i % 2}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    s = splits.load_splits(str(path), (20, 5, 5), seed=0)
    all_texts = s.train.texts + s.validation.texts + s.test.texts
    assert len(all_texts) == len(set(all_texts)) == 30


@pytest.mark.slow
def test_real_imdb_named_splits_are_disjoint():
    splits.named_splits.cache_clear()
    ns = splits.named_splits("imdb")
    assert ns.dropped_duplicates == 98
    seen: set[str] = set()
    for name in splits.SPLIT_NAMES:
        texts = set(ns[name].texts)
        assert len(texts) == len(ns[name]) and not texts & seen, name
        seen |= texts
    assert len(seen) == 24_902
