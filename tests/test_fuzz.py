"""Fuzzing the files anatomy-prune reads back (issue #13): plans (plan.json), model metadata
(anatomy_prune.json) and safetensors headers, mutated at random (types, ranges, sizes, missing keys,
nesting, truncation). Whatever they hold, reading them ends in success or a UserError, never another
exception; through the CLI, in exit status 0 or 2 with one line and nothing left behind.

A few cases of each run in the fast suite; `-m slow` runs a few hundred. Hypothesis is derandomized
(the same examples on every run) and keeps no example database.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from anatomy_prune.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from test_hostile import error_lines, snapshot  # noqa: E402


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


FAST, SLOW = 8, 300

# --- strategies ---------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-3, 60) | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "a", "../../x", "0", "1e9", "NaN", "classifier", "backbone", "causal-lm"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)
small_ints = st.lists(st.integers(-2, 40), max_size=40)


@st.composite
def mutated(draw, base: dict, int_keys: tuple[str, ...]) -> dict:
    """`base` with 1-4 mutations: a field set to anything, deleted, nested, a list item changed, a list
    resized, or the whole document replaced."""
    d = copy.deepcopy(base)
    if draw(st.integers(0, 19)) == 0:
        return draw(values)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(set(d) | set(int_keys) | {"extra"})))
        op = draw(st.sampled_from(["set", "delete", "nest", "item", "resize", "ints"]))
        if op == "set":
            d[key] = draw(values)
        elif op == "delete":
            d.pop(key, None)
        elif op == "nest" and key in d:
            d[key] = [d[key]]
        elif op == "ints":
            d[key] = draw(small_ints)
        elif op in ("item", "resize") and isinstance(d.get(key), list):
            items = d[key]
            if op == "resize":
                n = draw(st.integers(0, 6))
                d[key] = (items * 3)[:n] if items else []
            elif items:
                i = draw(st.integers(0, len(items) - 1))
                if isinstance(items[i], list) and items[i] and draw(st.booleans()):
                    j = draw(st.integers(0, len(items[i]) - 1))
                    items[i][j] = draw(scalars)
                else:
                    items[i] = draw(values | small_ints)
    return d


def as_bytes(draw, doc) -> bytes:
    """The document as a file: JSON (NaN allowed), sometimes truncated or with bytes that are not UTF-8."""
    text = json.dumps(doc).encode()
    how = draw(st.integers(0, 9))
    if how == 0:
        return text[: draw(st.integers(0, len(text)))]
    if how == 1:
        return b"\xff\xfe" + text
    return text


# --- plans ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_plan() -> dict:
    from anatomy_prune.plan.plan import PruningPlan
    keep = [list(range(0, 37, 2)), list(range(20)), [0, 5, 36]]
    return PruningPlan(keep=keep, widths=[37, 37, 37], base_model="tiny-bert", method="magnitude",
                       params={"allocation": "local"}, seed=0).to_dict()


def check_plan_file(base_plan: dict, data) -> None:
    from anatomy_prune.plan.plan import PruningPlan
    doc = data.draw(mutated(base_plan, ("keep", "widths", "params", "seed", "method", "base_model")))
    raw = as_bytes(data.draw, doc)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_bytes(raw)
        try:
            plan = PruningPlan.load(path)
        except UserError as exc:
            assert "\n" not in str(exc)
            event("refused")
            return
    event("loaded")
    # what loaded is a valid plan: it round-trips and its numbers make sense
    again = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.keep == plan.keep and again.widths == plan.widths
    assert 0.0 <= plan.sparsity < 1.0 and all(0 < w <= 1 << 20 for w in plan.widths)
    for layer, ids in enumerate(plan.keep):
        assert list(ids) == sorted(set(ids)) and all(0 <= i < plan.widths[layer] for i in ids)


@fuzz_settings(FAST * 3)
@given(data=st.data())
def test_fuzz_plan_files(base_plan, data) -> None:
    check_plan_file(base_plan, data)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(data=st.data())
def test_fuzz_plan_files_many(base_plan, data) -> None:
    check_plan_file(base_plan, data)


# --- model metadata (anatomy_prune.json) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    from conftest import make_classifier

    from anatomy_prune.models.saved import save_model
    return save_model(make_classifier("tiny-bert"), tmp_path_factory.mktemp("fuzz-model") / "m")


def check_metadata(saved_folder: Path, data) -> None:
    from anatomy_prune.models.loading import load_model
    meta = json.loads((saved_folder / "anatomy_prune.json").read_text())
    doc = data.draw(mutated(meta, ("kind", "ffn_widths", "dropout", "max_length", "plan", "finetune", "pruned",
                                   "attn_heads", "format")))
    raw = as_bytes(data.draw, doc)
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m"
        shutil.copytree(saved_folder, m)
        (m / "anatomy_prune.json").write_bytes(raw)
        try:
            loaded = load_model(str(m), device="cpu")
        except UserError as exc:
            assert "\n" not in str(exc)
            event("refused: " + str(exc).split(": ", 1)[-1][:40])
            return
        event("loaded")
        assert loaded.kind in ("classifier", "backbone", "causal-lm")


@fuzz_settings(FAST)
@given(data=st.data())
def test_fuzz_model_metadata(saved_folder, data) -> None:
    check_metadata(saved_folder, data)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(data=st.data())
def test_fuzz_model_metadata_many(saved_folder, data) -> None:
    check_metadata(saved_folder, data)


# --- safetensors headers ----------------------------------------------------------------------------------

def check_header(data) -> None:
    from anatomy_prune.models.saved import safetensors_header
    base = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}, "__metadata__": {"format": "pt"}}
    doc = data.draw(mutated(base, ("a", "b")))
    if isinstance(doc, dict) and data.draw(st.booleans()):
        for entry in doc.values():    # mutate inside the tensor entries too
            if isinstance(entry, dict):
                key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                entry[key] = data.draw(values | small_ints)
    header = json.dumps(doc).encode()
    declared = data.draw(st.sampled_from([len(header), len(header), 0, len(header) + 1, 1 << 62,
                                          data.draw(st.integers(0, (1 << 64) - 1))]))
    body = b"\0" * data.draw(st.sampled_from([32, 0, 8, 31, 64]))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "model.safetensors"
        p.write_bytes(struct.pack("<Q", declared) + header + body)
        try:
            out = safetensors_header(p)
        except UserError as exc:
            assert "\n" not in str(exc)
            event("refused")
            return
    event("loaded")
    for name, (dtype, shape) in out.items():   # what passed is a header safetensors can load from
        assert isinstance(name, str) and isinstance(dtype, str)
        assert all(isinstance(s, int) and s >= 0 for s in shape) and math.prod(shape) <= len(body)


@fuzz_settings(FAST)
@given(data=st.data())
def test_fuzz_safetensors_headers(data) -> None:
    check_header(data)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(data=st.data())
def test_fuzz_safetensors_headers_many(data) -> None:
    check_header(data)


# --- through the CLI: prune --plan ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_world(saved_folder, tmp_path_factory, base_plan) -> dict:
    import csv
    root = tmp_path_factory.mktemp("fuzz-cli")
    data = root / "reviews.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([("a fine film", 1), ("a dull film", 0), ("superb", 1), ("awful", 0)])
    return {"model": saved_folder, "data": data, "root": root}


def check_cli_plan(cli_world: dict, base_plan: dict, data, capsys) -> None:
    from anatomy_prune.cli import main
    doc = data.draw(mutated(base_plan, ("keep", "widths", "params", "seed", "method")))
    raw = as_bytes(data.draw, doc)
    ws = Path(tempfile.mkdtemp(dir=cli_world["root"]))
    try:
        (ws / "plan.json").write_bytes(raw)
        before = snapshot(ws, cli_world["model"])
        capsys.readouterr()
        rc = main(["prune", "--model", str(cli_world["model"]), "--plan", str(ws / "plan.json"), "--data",
                   str(cli_world["data"]), "--eval-size", "4", "--max-length", "16", "--out", str(ws / "out")])
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err
        event(f"exit {rc}")
        after = snapshot(ws, cli_world["model"])
        if rc == 2:
            lines = error_lines(err)
            assert len(lines) == 1 and lines[0].startswith("anatomy-prune prune"), lines
            assert before == after
        else:
            assert {k: v for k, v in after.items() if not k.startswith(str(ws / "out"))} == before
    finally:
        shutil.rmtree(ws, ignore_errors=True)


@fuzz_settings(FAST - 2)
@given(data=st.data())
def test_fuzz_prune_with_plan(cli_world, base_plan, data, capsys) -> None:
    check_cli_plan(cli_world, base_plan, data, capsys)


@pytest.mark.slow
@fuzz_settings(SLOW // 3)
@given(data=st.data())
def test_fuzz_prune_with_plan_many(cli_world, base_plan, data, capsys) -> None:
    check_cli_plan(cli_world, base_plan, data, capsys)
