import json

import pytest

from anatomy_prune import UserError
from anatomy_prune.data import (TextSet, calibration_set, clean, eval_set, load_probes, load_splits,
                                read_labelled_file, read_texts, resolve_inputs, split)


def test_probes_are_the_papers_ten():
    probes = load_probes()
    assert [p["id"] for p in probes] == list(range(10))
    assert probes[8]["subtask"].endswith("Sarcasm")


def test_clean_removes_br_tags():
    assert clean("Great.<br /><br />Really<br/>great") == "Great. Really great"


def test_imdb_offline_has_25000_balanced_reviews():
    splits = load_splits("imdb", (100, 50, 1000), seed=0)
    assert len(splits.test) == 1000 and len(splits.validation) == 50 and len(splits.train) == 100
    assert 400 < sum(splits.test.labels) < 600  # shuffled: both classes
    assert not any("<br" in t for t in splits.test.texts)
    again = load_splits("imdb", (100, 50, 1000), seed=0)
    assert again.test.texts == splits.test.texts and again.train.texts == splits.train.texts
    # train, validation and test never share a review
    parts = [set(splits.train.texts), set(splits.validation.texts), set(splits.test.texts)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1150
    # the test split does not depend on the train size
    assert eval_set("imdb", 1000).texts == splits.test.texts
    assert load_splits("imdb", (300, 50, 1000), seed=0).test.texts == splits.test.texts


def test_too_large_split_is_refused():
    with pytest.raises(UserError, match="choose smaller sizes|ask for at most"):
        load_splits("imdb", (25_000, 4_000, 1_000))


def test_user_csv_and_jsonl(tmp_path, tiny_csv):
    data = read_labelled_file(tiny_csv)
    assert len(data) == 24 and set(data.labels) == {0, 1}
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in zip(data.texts, data.labels)))
    assert read_labelled_file(j).texts == data.texts


@pytest.mark.parametrize("content,msg", [("text,label\nhello,2\n", "not binary"), ("text,label\n", "no rows"),
                                         ("words,y\nhello,1\n", "header")])
def test_bad_user_files(tmp_path, content, msg):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(UserError, match=msg):
        read_labelled_file(p)


def test_missing_and_wrong_type_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_labelled_file(tmp_path / "none.csv")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(UserError, match="must end in"):
        read_labelled_file(tmp_path / "x.parquet")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(UserError, match="JSON object"):
        read_labelled_file(tmp_path / "bad.jsonl")


def test_inputs(tmp_path):
    texts, names = resolve_inputs("probes")
    assert len(texts) == 10 and names[0].startswith("0:")
    texts, _ = resolve_inputs("imdb:3")
    assert len(texts) == 3
    f = tmp_path / "in.txt"
    f.write_text("one\n\n two \n")
    assert resolve_inputs(str(f))[0] == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no text"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="imdb:N"):
        resolve_inputs("imdb:lots")


def test_split_is_disjoint_and_seeded():
    data = TextSet([f"t{i}" for i in range(30)], [i % 2 for i in range(30)])
    s = split(data, (10, 5, 5), seed=3, source="x")
    seen = s.train.texts + s.validation.texts + s.test.texts
    assert len(set(seen)) == 20 and len(s.train) == 10 and len(s.validation) == 5 and len(s.test) == 5
    assert all(data.labels[data.texts.index(t)] == y for t, y in zip(s.test.texts, s.test.labels))
    assert split(data, (10, 5, 5), seed=3, source="x").test.texts == s.test.texts      # the same seed
    assert split(data, (10, 5, 5), seed=4, source="x").test.texts != s.test.texts      # another shuffle
    with pytest.raises(UserError, match="choose smaller sizes"):
        split(data, (20, 6, 5), seed=3, source="x")


def test_calibration_set_from_a_text_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("first text\n\nsecond text\nthird text\nfourth text\n")
    cal = calibration_set(2, source=str(f), exclude=["first text"])
    assert cal.texts == ["second text", "third text"] and cal.labels == [-1, -1]  # unlabelled, eval text left out
    assert len(calibration_set(10, source=str(f))) == 4
    with pytest.raises(UserError, match="calib-size"):
        calibration_set(0, source=str(f))
    with pytest.raises(UserError, match="no text outside the evaluation set"):
        calibration_set(2, source=str(f), exclude=["first text", "second text", "third text", "fourth text"])
