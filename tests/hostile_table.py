"""Run every hostile-input case of tests/test_hostile.py against a source tree and print what it handles well.

    python tests/hostile_table.py                                  # this tree
    python tests/hostile_table.py --before /work/wt-golden/src     # also an older tree, side by side

Each case runs in a subprocess (PYTHONPATH=the tree's src) after the same setup; "well" means every check of
the promise holds (exit status, one line, no traceback, nothing changed, refused before a model is built);
the error message is reported apart (older trees word things differently). A case marked as not applying
to the older tree (an option it lacks) is shown as n/a there and left out of its count.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import test_hostile as th  # noqa: E402


def verdict_text(verdict: dict) -> tuple[bool, bool, str]:
    """(well, message ok, what failed)."""
    bad = {k: v for k, v in verdict.items() if v is not True}
    well = not {k for k in bad if k != "message"}
    return well, "message" not in bad, "; ".join(f"{k}: {str(v)[:90]}" for k, v in bad.items())


def run_all(src: Path, assets: th.Assets, base: Path, jobs: int, older: bool) -> dict[str, tuple]:
    def one(case: th.Case):
        if older and case.golden is not True:
            return case.id, None
        try:
            verdict, res = th.run_case(case, assets, base, capsys=None, src=src)
        except Exception as exc:  # noqa: BLE001 - a setup that does not fit the tree
            return case.id, (False, False, f"harness: {type(exc).__name__}: {exc}"[:160], 0.0)
        return case.id, (*verdict_text(verdict), res.seconds)

    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, th.CASES))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(HERE.parent / "src"), help="the tree to check (default: this one)")
    ap.add_argument("--before", default=None, help="an older tree to compare with, e.g. /work/wt-golden/src")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated case ids")
    args = ap.parse_args()
    if args.only:
        th.CASES[:] = [c for c in th.CASES if c.id in args.only.split(",")]
    base = Path(tempfile.mkdtemp(prefix="hostile-table-"))
    t0 = time.perf_counter()
    assets = th.build_assets(base / "assets")
    after = run_all(Path(args.src), assets, base, args.jobs, older=False)
    before = run_all(Path(args.before), assets, base, args.jobs, older=True) if args.before else {}
    width = max(len(c.id) for c in th.CASES)

    def cell(r) -> str:
        if r is None:
            return "n/a"
        return ("well" if r[0] else "NO") + ("" if r[1] else " (msg)")

    print(f"{'case':<{width}}  {'before':<10}  {'after':<10}  what failed")
    for c in th.CASES:
        a, b = after[c.id], before.get(c.id, None) if args.before else None
        why = []
        if args.before and b is not None and not (b[0] and b[1]):
            why.append(f"before: {b[2]}")
        if not (a[0] and a[1]):
            why.append(f"after: {a[2]}")
        note = "" if c.golden is True or not args.before else f"[n/a before: {c.golden}] "
        note += f"[known fault, xfail in the suite: {c.xfail}] " if c.xfail else ""
        print(f"{c.id:<{width}}  {cell(b) if args.before else '-':<10}  {cell(a):<10}  {note}{' | '.join(why)}")
    n = len(th.CASES)
    print(f"\n{n} hostile inputs; after ({args.src}): {sum(r[0] for r in after.values())} handled well, "
          f"{sum(r[0] and r[1] for r in after.values())} with the expected message")
    if args.before:
        applies = [r for r in before.values() if r is not None]
        same = [c.id for c in th.CASES if before[c.id] is not None]
        print(f"before ({args.before}): {len(applies)} cases apply, {sum(r[0] for r in applies)} handled well; "
              f"after, on the same {len(same)}: {sum(after[i][0] for i in same)} handled well")
    print(f"({time.perf_counter() - t0:.0f} s)")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
