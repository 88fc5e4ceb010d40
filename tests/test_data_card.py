"""The top-level data/ folder: the probes the package ships are the same bytes, the data card's split table
agrees with the manifest, and the manifest tool writes what the card says on a synthetic source."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

from anatomy_prune.data.reviews import TextSet
from anatomy_prune.data.splits import OFFLINE_LAYOUT, NamedSplits, _cut, _shuffled, dedup

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _tool():
    spec = importlib.util.spec_from_file_location("splits_manifest", ROOT / "tools" / "splits_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_ships_the_same_probes():
    shipped = ROOT / "src" / "anatomy_prune" / "data" / "probes.json"
    assert (DATA / "probes.json").read_bytes() == shipped.read_bytes()
    probes = json.loads((DATA / "probes.json").read_text())["probes"]
    assert [p["id"] for p in probes] == list(range(10)) and all(p["text"].strip() for p in probes)


def test_the_manifest_is_small_well_formed_and_matches_the_card():
    path = DATA / "splits_manifest.json"
    assert path.stat().st_size < 100_000
    m = json.loads(path.read_text())
    imdb = m["sources"]["imdb"]
    splits = imdb["splits"]
    assert set(splits) == {"test", "validation", "heldout", "calibration", "train"}
    assert sum(s["count"] for s in splits.values()) + imdb["dropped_duplicates"] == 25_000
    for name, n in OFFLINE_LAYOUT:
        assert splits[name]["count"] == n
    for s in splits.values():
        assert re.fullmatch("[0-9a-f]{64}", s["digest"]) and len(s["first"]) == 5 and 0 < s["positives"] < s["count"]
    card = (DATA / "README.md").read_text()
    for name, s in splits.items():  # the card's table row: | name | count (positives positive) | ...
        row = re.search(rf"^\| {name} \| ([\d,]+) \((\d[\d,]*) positive\)", card, re.M)
        assert row, name
        assert (int(row[1].replace(",", "")), int(row[2].replace(",", ""))) == (s["count"], s["positives"])


def test_the_tool_hashes_every_text_in_order(tmp_path):
    """On a synthetic source cut like the offline IMDB: counts, positives, the digest over the ordered text
    hashes (one changed review or a swapped order changes it) and the first hashes."""
    tool = _tool()
    n = sum(k for _, k in OFFLINE_LAYOUT) + 37
    raw = TextSet([f"review {i}" for i in range(n)] + ["review 3"], [i % 2 for i in range(n)] + [1])
    full, dropped = dedup(raw)
    named = NamedSplits("synthetic", _cut(_shuffled(full, 0), OFFLINE_LAYOUT, rest="train"), dropped)
    entry = tool.source_manifest(named)
    assert entry["dropped_duplicates"] == 1 and entry["splits"]["train"]["count"] == 37
    test = named["test"]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in test.texts]
    want = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    got = entry["splits"]["test"]
    assert got["digest"] == want and got["first"] == [h[:16] for h in hashes[:5]]
    assert got["positives"] == sum(test.labels)
    swapped = tool.split_entry(test.texts[1::-1] + test.texts[2:], test.labels)
    assert swapped["digest"] != got["digest"] and swapped["count"] == got["count"]
