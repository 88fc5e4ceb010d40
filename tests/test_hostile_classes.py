"""The classes of hostile input of issue 23, each by a generator (Hypothesis) or a parametrised family rather
than by one case: special files as outputs, tampered safetensors headers and index files, configs with bad
values, tokenizers larger than the embeddings, device names and budgets, sizes, paths with control characters,
over-long names and link loops, JSONL / CSV data, and warnings before a one-line error. (Killed commits:
tests/test_commit.py.) Whatever the input, the answer is success or a one-line UserError, never another
exception, and nothing but a regular file is replaced."""
from __future__ import annotations

import json
import math
import os
import socket
import stat
import struct
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomy_prune.errors import UserError, printable
from anatomy_prune.runfolder import check_out_path, check_output_file, usable_path, write_json, write_text

sys.path.insert(0, str(Path(__file__).parent))

FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\r" not in text and text.strip(), repr(text)
    return text


# --- 2. outputs: only regular or new files ------------------------------------------------------------

def _special(tmp: Path, kind: str) -> Path:
    p = tmp / f"node-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "link-outside":
        (tmp / "elsewhere").mkdir()
        (tmp / "elsewhere" / "f.json").write_text("theirs")
        p.symlink_to(tmp / "elsewhere" / "f.json")
    elif kind == "dangling-link":
        p.symlink_to(tmp / "nowhere.json")
    elif kind == "folder":
        p.mkdir()
    return p


SPECIAL = ["fifo", "chardev", "socket", "link-outside", "dangling-link", "folder"]


@pytest.mark.parametrize("writer", ["check_output_file", "write_json", "write_text"])
@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_are_never_replaced(tmp_path, kind, writer):
    p = _special(tmp_path, kind)
    before = p.lstat()
    with pytest.raises(UserError) as err:
        {"check_output_file": lambda: check_output_file(p, "--json"), "write_json": lambda: write_json(p, {"a": 1}),
         "write_text": lambda: write_text(p, "x")}[writer]()
    one_line(err.value)
    after = p.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]


names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                max_size=40).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 200)


@FEW
@given(name=names, exists=st.booleans())
def test_a_regular_or_new_file_is_written_whole_and_nothing_is_left_beside(tmp_path_factory, name, exists):
    d = tmp_path_factory.mktemp("w")
    p = d / name
    if exists:
        p.write_text("old")
    write_json(p, {"v": name})
    assert json.loads(p.read_text()) == {"v": name} and stat.S_ISREG(p.lstat().st_mode)
    assert sorted(q.name for q in d.iterdir()) == [name]


# --- 3. load only what is declared, checked before use -----------------------------------------------

def _st_bytes(header: dict, data: bytes, extra: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data + extra


DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "C64", "F8_E4M3", "c64", "", "F33"]


@FEW
@given(shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=4),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
       gap=st.integers(0, 3), trailing=st.integers(0, 3), shift=st.integers(-2, 2))
def test_tampered_safetensors_headers(tmp_path_factory, shapes, dtypes, gap, trailing, shift):
    """Headers with any dtype, gaps between tensors, trailing bytes or shifted offsets: parsed only when the
    file is covered exactly by real-number tensors whose byte counts match their shapes."""
    from anatomy_prune.models.trust import DTYPE_BYTES, safetensors_header
    header, data = {}, b""
    for i, shape in enumerate(shapes):
        dt = dtypes[i]
        n = math.prod(shape) * DTYPE_BYTES.get(dt, 4)
        start = len(data) + (gap if i == 1 else 0)
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [start, start + n + (shift if i == 0 else 0)]}
        data += b"\0" * (start - len(data) + n)
    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    p.write_bytes(_st_bytes(header, data, b"\1" * trailing))
    valid = (all(dtypes[i] in DTYPE_BYTES for i in range(len(shapes))) and trailing == 0 and shift == 0
             and (gap == 0 or len(shapes) < 2))
    try:
        out = safetensors_header(p)
    except UserError as exc:
        one_line(exc)
        assert not valid, str(exc)
    else:
        assert valid
        assert set(out) == {f"t{i}" for i in range(len(shapes))}


@FEW
@given(entry=st.one_of(st.text(max_size=30), st.sampled_from(["../evil.safetensors", "/etc/passwd", "sub/x.safetensors",
                                                              ".", "", "model.safetensors", "nothere.safetensors"])),
       what=st.sampled_from(["file", "dir", "link-out"]))
def test_an_index_names_only_files_inside_the_folder(tmp_path_factory, entry, what):
    from anatomy_prune.models.trust import INDEX, declared_weights
    d = tmp_path_factory.mktemp("idx")
    m = d / "m"
    m.mkdir()
    (d / "evil.safetensors").write_bytes(b"x")
    target = m / "model.safetensors"
    if what == "file":
        target.write_bytes(b"x")
    elif what == "dir":
        target.mkdir()
    else:
        target.symlink_to(d / "evil.safetensors")
    (m / INDEX).write_text(json.dumps({"weight_map": {"w": entry}}))
    try:
        files = declared_weights(m)
    except UserError as exc:
        one_line(exc)
    else:
        assert files == [target] and entry == "model.safetensors" and what == "file"


BAD_VALUES = [0, -1, -32, 1.5, "32", None, True, float("nan"), float("inf"), 2 ** 60]


@FEW
@given(key=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "vocab_size", "max_position_embeddings", "layer_norm_eps", "initializer_range",
                            "quantization_config", "model_type", "rope_scaling"]),
       value=st.sampled_from(BAD_VALUES) | st.floats(allow_nan=True, allow_infinity=True)
       | st.dictionaries(st.sampled_from(["quant_method", "factor"]), st.sampled_from([1, "gptq", float("nan")]),
                         max_size=2)
       | st.sampled_from(["bart", "t5", "evil", "bert"]))
def test_config_values_are_checked(key, value):
    from anatomy_prune.models.trust import SIZE_KEYS, check_config_values
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
           "intermediate_size": 37, "vocab_size": 100, "layer_norm_eps": 1e-12, key: value}
    try:
        check_config_values(cfg, "'config.json'", {"bert", "gpt2"})
    except UserError as exc:
        one_line(exc)
    else:
        flat = json.dumps(value) if not isinstance(value, float) else str(value)
        assert "NaN" not in flat and "Infinity" not in flat and "inf" not in flat
        if key in SIZE_KEYS:
            assert value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        if key == "quantization_config":
            assert not value
        if key == "model_type":
            assert value in ("bert",)


@pytest.fixture(scope="module")
def saved_clf(tmp_path_factory):
    from conftest import make_classifier

    from anatomy_prune.models.saved import save_model
    return save_model(make_classifier("tiny-bert"), tmp_path_factory.mktemp("clf") / "m")


def _edit_weights(m: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(m / "model.safetensors")
    save_file(fn(t), m / "model.safetensors", metadata={"format": "pt"})


def _first(t):
    return next(k for k, v in t.items() if v.dim() == 2)


def _cfg(m: Path, **kw) -> None:
    c = json.loads((m / "config.json").read_text())
    c.update(kw)
    (m / "config.json").write_text(json.dumps(c))


def _small_vocab(m: Path) -> None:
    def cut(t):
        k = next(k for k in t if "word_embeddings" in k)
        t[k] = t[k][:500].contiguous()
        return t
    _edit_weights(m, cut)
    _cfg(m, vocab_size=500)


TAMPER = {
    "weights-folder": lambda m: ((m / "model.safetensors").unlink(), (m / "model.safetensors").mkdir()),
    "trailing-bytes": lambda m: (m / "model.safetensors").open("ab").write(b"\0" * 16),
    "int32": lambda m: _edit_weights(m, lambda t: {**t, _first(t): t[_first(t)].int()}),
    "complex": lambda m: _edit_weights(m, lambda t: {**t, _first(t): t[_first(t)].to(__import__("torch").complex64)}),
    "second-file": lambda m: (m / "model-2.safetensors").write_bytes((m / "model.safetensors").read_bytes()),
    "tokenizer-too-big": _small_vocab,
    "nan-config": lambda m: (m / "config.json").write_text(
        (m / "config.json").read_text().replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": NaN')),
    "zero-heads": lambda m: _cfg(m, num_attention_heads=0),
    "quantized": lambda m: _cfg(m, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
    "unknown-type": lambda m: _cfg(m, model_type="bart"),
}


@pytest.mark.parametrize("plain", [False, True], ids=["saved", "plain"])
@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_a_tampered_model_folder_is_refused_before_a_model_is_built(saved_clf, tmp_path, tamper, plain):
    import shutil

    from test_hostile import count_builds

    from anatomy_prune.models.loading import load_model
    m = tmp_path / "m"
    shutil.copytree(saved_clf, m)
    if plain:
        (m / "anatomy_prune.json").unlink()
        (m / "head.safetensors").unlink()
    TAMPER[tamper](m)
    if plain and tamper == "second-file":   # a plain folder's undeclared file is simply not read (next test)
        load_model(str(m), device="cpu")
        return
    with count_builds() as built, pytest.raises(UserError) as err:
        load_model(str(m), device="cpu")
    one_line(err.value)
    assert built == [], f"{tamper}: a model was built before the refusal ({err.value})"


def test_an_undeclared_file_in_a_plain_folder_is_not_read(saved_clf, tmp_path):
    import shutil

    import torch

    from anatomy_prune.models.loading import load_model
    m = tmp_path / "m"
    shutil.copytree(saved_clf, m)
    (m / "anatomy_prune.json").unlink()
    (m / "head.safetensors").unlink()
    ref = load_model(str(m), device="cpu")
    from safetensors.torch import load_file, save_file
    t = load_file(m / "model.safetensors")
    save_file({k: v * 0 for k, v in t.items()}, m / "zzz.safetensors")
    again = load_model(str(m), device="cpu")
    for a, b in zip(ref.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


# --- 4. devices and budgets, 5. sizes -----------------------------------------------------------------

@FEW
@given(dm=st.sampled_from(["auto", "balanced", "sequential", "cpu", "cuda", "cuda:0", "cuda:7", "0", "3", "meta",
                           "disk", "toaster", "", " ", "CPU", "mps", "cuda:-1"]) | st.text(max_size=12))
def test_device_maps_are_checked_against_the_machine(dm):
    import torch

    from anatomy_prune.models.offload import Placement
    try:
        p = Placement.make(device_map=dm)
    except UserError as exc:
        one_line(exc)
    else:
        d = p.device_map
        assert d in ("auto", "balanced", "sequential", "balanced_low_0", "cpu") or (
            torch.cuda.is_available() and str(d).replace("cuda:", "").isdigit())


@FEW
@given(budget=st.lists(st.tuples(st.sampled_from(["0", "1", "7", "cuda:0", "cpu", "disk", "meta", "x"]),
                                 st.sampled_from(["1GiB", "0.5", "0", "-1GiB", "1e9", "NaN", "14GiB", "2PiB"])),
                       min_size=1, max_size=3))
def test_max_memory_names_only_devices_this_machine_has(budget):
    import torch

    from anatomy_prune.models.offload import Placement
    text = ",".join(f"{k}:{v}" for k, v in budget)
    try:
        p = Placement.make(device_map="auto", max_memory=text)
    except UserError as exc:
        one_line(exc)
    else:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        assert all(isinstance(k, str) or k < n for k in p.max_memory)
        assert all(isinstance(v, int) and v >= 1 for v in p.max_memory.values())


@FEW
@given(text=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str),
                      st.tuples(st.floats(0, 1e6), st.sampled_from(["", "B", "KB", "MiB", "GiB", "TB", "xB"]))
                      .map(lambda t: f"{t[0]}{t[1]}"), st.text(max_size=10)),
       what=st.sampled_from(["--max-shard-size", "--max-memory cpu"]))
def test_sizes_are_whole_bytes_within_documented_bounds(text, what):
    from anatomy_prune.models.budget import MAX_SIZE, SIZE_BOUNDS, parse_size
    try:
        n = parse_size(text, what)
    except UserError as exc:
        one_line(exc)
    else:
        least, most = SIZE_BOUNDS.get(what, (1, MAX_SIZE))
        assert isinstance(n, int) and least <= n <= most


# --- 6. paths and names -------------------------------------------------------------------------------

@FEW
@given(name=st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=20),
       ctrl=st.sampled_from(["\n", "\r", "\t", "\x1b[31m", "\u2028", "\x07", "\x85"]))
def test_paths_with_control_characters_stay_on_one_line(tmp_path_factory, name, ctrl):
    d = tmp_path_factory.mktemp("p")
    (d / "file").write_text("x")
    for bad in (d / "file" / (name + ctrl), d / "missing" / (ctrl + name) / "x.json"):
        with pytest.raises(UserError) as err:
            check_out_path(bad) if bad.name != "x.json" else check_output_file(bad, "--json")
            raise UserError(f"accepted '{bad}'")  # a path under a file or a missing folder is never usable
        one_line(err.value)
    assert "\n" not in printable(name + ctrl) and "\u2028" not in printable(ctrl)


@pytest.mark.parametrize("length", [256, 300, 1000])
@pytest.mark.parametrize("where", ["--out", "--json", "model"])
def test_over_long_names_and_link_loops_get_the_one_line_error(tmp_path, length, where):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for p in (tmp_path / ("a" * length), tmp_path / "loop" / "x"):
        with pytest.raises(UserError) as err:
            if where == "--out":
                check_out_path(p)
            elif where == "--json":
                check_output_file(p, "--json")
            else:
                from anatomy_prune.models.loading import load_model
                load_model(str(p))
        one_line(err.value)


# --- 7. data ------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


@FEW
@given(text=json_values, depth=st.integers(0, 3) | st.just(50_000))
def test_a_jsonl_text_must_be_a_string(tmp_path_factory, text, depth):
    from anatomy_prune.data.reviews import read_labelled_file
    p = tmp_path_factory.mktemp("d") / "d.jsonl"
    body = json.dumps(text)
    if depth == 50_000:
        body = "[" * depth + "]" * depth
    p.write_text('{"text": ' + body + ', "label": 1}\n')
    try:
        data = read_labelled_file(p)
    except UserError as exc:
        one_line(exc)
        assert depth == 50_000 or not isinstance(text, str) or not " ".join(text.split())
    else:
        assert isinstance(text, str) and depth != 50_000 and data.texts == [" ".join(text.split())]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_a_line_over_the_cap_is_refused_and_a_bom_is_accepted(tmp_path, suffix):
    from anatomy_prune.data.reviews import MAX_LINE, read_labelled_file, read_texts
    rows = {".csv": ("text,label\n{}, 1\nok,0\n", "text,label\n{},1\n"),
            ".jsonl": ('{{"text": "{}", "label": 1}}\n', '{{"text": "{}", "label": 1}}\n'),
            ".txt": ("{}\nshort\n", "{}\n")}[suffix]
    read = read_texts if suffix == ".txt" else read_labelled_file
    long = tmp_path / ("long" + suffix)
    long.write_text(rows[0].format("w" * (MAX_LINE + 10)))
    with pytest.raises(UserError, match="cap|at most") as err:
        read(long)
    one_line(err.value)
    bom = tmp_path / ("bom" + suffix)
    bom.write_bytes(b"\xef\xbb\xbf" + rows[1].format("a fine review").encode())
    got = read(bom)
    assert (got if suffix == ".txt" else got.texts) == ["a fine review"]


# --- 8. warnings stay off stderr ----------------------------------------------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_warnings_before_an_error_do_not_reach_the_user(capsys, monkeypatch, verbose):
    import torch

    from anatomy_prune import cli

    def noisy(args):
        torch.nn.init.normal_(torch.empty(0, 4))       # torch: "Initializing zero-element tensors is a no-op"
        warnings.warn("a library warning", UserWarning)
        raise UserError("the one line\nthat stays one line")

    add, _ = cli.COMMANDS["evaluate"]
    monkeypatch.setitem(cli.COMMANDS, "evaluate", (add, noisy))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rc = cli.main((["--verbose"] if verbose else []) + ["evaluate", "--model", "tiny-bert"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2
    if verbose:   # shown as log records (with --verbose only), the error still last and one line
        assert err[-1] == "anatomy-prune evaluate: error: the one line\\nthat stays one line"
    else:
        assert err == ["anatomy-prune evaluate: error: the one line\\nthat stays one line"]


def test_offloaded_weights_live_in_the_staging_folder_and_go_with_it(tmp_path):
    """Disk offload inside a run: the offload folder is the run's scratch (removed with the staging folder),
    never an offload-XXXX beside the user's files, even with --offload-folder given."""
    from anatomy_prune.models.loading import load_model
    from anatomy_prune.runfolder import RunFolder
    src = load_model("tiny-llama", device="cpu")
    src.model.save_pretrained(tmp_path / "dense")
    src.tokenizer.save_pretrained(tmp_path / "dense")
    sizes = [sum(p.numel() * 4 for p in m.parameters()) for m in (src.model.model.embed_tokens, src.model.model.layers[0])]
    user = tmp_path / "user"
    user.mkdir()
    with RunFolder(tmp_path / "out", "probe", {}) as rf:
        big = load_model(str(tmp_path / "dense"), device_map="auto", max_memory=f"cpu:{sizes[0] + 2 * sizes[1]}",
                         offload_folder=str(user))
        assert "disk" in set(big.model.hf_device_map.values())
        assert (rf.staging / ".scratch" / "offload").is_dir()
        rf.write_json("done.json", {})
    assert list(user.iterdir()) == []
    assert not (tmp_path / "out" / ".anatomy-prune-staging").exists()


def test_exit_status_is_the_one_place_bad_input_becomes_one_line_and_2(capsys):
    """errors.exit_status, which the CLI and every benchmark script run their body through: a UserError and an
    error that only a named path can cause are one escaped line and exit 2; a job's own status passes through;
    anything else (a bug) keeps its traceback."""
    import errno

    from anatomy_prune.errors import UserError, exit_status

    def raising(exc):
        def job():
            raise exc
        return job

    assert exit_status(lambda: None) == 0 and exit_status(lambda: 3) == 3
    assert exit_status(raising(UserError("bad\nvalue")), "tool sub") == 2
    assert capsys.readouterr().err == "tool sub: error: bad\\nvalue\n"
    assert exit_status(raising(OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use 'xxx") and err.count("\n") == 1
    assert exit_status(raising(RecursionError())) == 2 and "nested too deeply" in capsys.readouterr().err
    for bug in (ValueError("a bug"), OSError("no filename: a bug"), RuntimeError("a bug")):
        with pytest.raises(type(bug)):
            exit_status(raising(bug))
