"""Hostile inputs (issue #13): nothing lost, nothing run, nothing half-written.

Every case runs the CLI on one bad input and checks the promise:
  - exit status 2 (130 for SIGINT), or 0 where the input is hostile but legal (a symbolic link that must not
    be followed, a --force beside a user's files, ...);
  - stderr holds exactly one line, starting with "anatomy-prune" (progress bars and time-stamped log lines
    aside), and no traceback; the line names what is wrong (`msg`, a regex);
  - the folder around --out is byte for byte as it was: every path, every file's bytes, every symbolic
    link's target, every mode (a run that succeeds may add entries under --out only);
  - with `no_load`, the refusal comes before any model is built.

The cases are data (`CASES`: argv + setup + expectation), so `tests/hostile_table.py` can run the same list
against another source tree (e.g. the pre-refactor library) and count what each handles well.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CACHE = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S+: ")          # logging's format in cli.main
TQDM_LINE = re.compile(r"\d+%\|")                          # a tqdm progress bar
PROBE = "hostile-probe: a model was built"                 # printed by the subprocess bootstrap (see BOOT)

TEXTS = ["The acting was superb and the plot gripping.", "Dull, predictable and far too long.",
         "An absolute masterpiece.", "I want those two hours back, truly awful from start to end."]


# --- the checks ------------------------------------------------------------------------------------

def error_lines(err: str) -> list[str]:
    """stderr without progress bars, time-stamped log lines and the model-built probe."""
    keep = []
    for line in err.replace("\r", "\n").splitlines():
        if not line.strip() or LOG_LINE.match(line) or TQDM_LINE.search(line) or line.startswith(PROBE):
            continue
        keep.append(line)
    return keep


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots (the roots included): (kind, mode, sha256 of a file | a link's target)."""
    snap: dict[str, tuple] = {}

    def entry(p: Path) -> tuple:
        st = p.lstat()
        if p.is_symlink():
            return ("link", st.st_mode, os.readlink(p))
        if p.is_file():
            return ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        return ("dir" if p.is_dir() else "other", st.st_mode, None)

    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            continue
        snap[str(root)] = entry(root)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                snap[str(p)] = entry(p)
    return snap


def diff(before: dict, after: dict) -> list[str]:
    changed = [f"changed {k}" for k in before if k in after and before[k] != after[k]]
    return changed + [f"removed {k}" for k in before if k not in after] + \
        [f"added {k}" for k in after if k not in before]


def _under(path: str, folder: Path) -> bool:
    return path == str(folder) or path.startswith(str(folder) + os.sep)


def unchanged_except_out(before: dict, after: dict, out: Path) -> list[str]:
    """For a run that succeeded: outside --out nothing changed; inside, entries that were there before and
    that anatomy-prune did not write (a user's files) are unchanged; new entries only under --out."""
    own = set()
    marker = out / ".anatomy-prune.json"
    if marker.is_file():
        with contextlib.suppress(ValueError):
            own = set(json.loads(marker.read_text()).get("outputs", []))
    problems = []
    for k, v in before.items():
        if _under(k, out) and k != str(out):
            top = Path(k).relative_to(out).parts[0]
            if top.startswith(".anatomy-prune") or top in own:
                continue
        if after.get(k) != v and k != str(out):
            problems.append(f"{'changed' if k in after else 'removed'} {k}")
    problems += [f"added {k} (outside --out)" for k in after if k not in before and not _under(k, out)]
    return problems


# --- cases ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Assets:
    """Inputs shared by all cases, built once (never written by a case: checked at the end)."""
    root: Path
    clf: Path          # a saved tiny-bert classifier (random head)
    roberta: Path      # a saved tiny-roberta classifier (128 usable positions)
    mpnet: Path        # a saved tiny-mpnet classifier (128 usable positions)
    csv: Path          # 24 labelled reviews
    text: Path         # 40 lines of word salad
    pruned: Path       # a prune run folder on `clf` (made by the CLI)


@dataclasses.dataclass
class Ctx:
    """One case's world: `ws` is snapshotted before and after; the command runs in `cwd` (inside ws)."""
    ws: Path
    assets: Assets

    @property
    def cwd(self) -> Path:
        return self.ws / "cwd"

    @property
    def out(self) -> Path:
        return self.ws / "out"

    def copy_model(self, name: str = "m", src: Path | None = None) -> Path:
        dst = self.ws / name
        shutil.copytree(src or self.assets.clf, dst)
        return dst

    def write(self, name: str, content: str | bytes) -> Path:
        p = self.ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p


DELETE = object()


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    setup: Callable[[Ctx], None] | None = None
    rc: int = 2
    msg: str | None = None            # regex the one error line must match (rc 2)
    no_load: bool = False             # refused before any model is built
    after: Callable[[Ctx], None] | None = None   # extra checks after the run
    hold: Callable[[Ctx], contextlib.AbstractContextManager] | None = None  # held around the run
    env: dict = dataclasses.field(default_factory=dict)
    unprivileged: bool = False        # permissions must apply (as root: a subprocess without the capabilities)
    golden: bool | str = True         # applies to the pre-refactor CLI (or: why not)
    out: str | None = None            # --out of a succeeding run (default: ws/out)
    guard: str | None = None          # an --out outside the workspace: the CLI runs only if the library's own
                                      # check refuses it first (a regression must not write there)
    xfail: str | None = None          # a known fault left to the code's owner (strict: a fix makes it pass)


def _flat(cmd: str, opts: dict) -> list[str]:
    argv = [cmd]
    for k, v in opts.items():
        if v is None or v is False:
            continue
        argv += [k] if v is True else [k, str(v)]
    return argv


def _opts(base: dict, over: dict) -> dict:
    opts = dict(base)
    for k, v in over.items():
        opts[k if k.startswith("--") else "--" + k.replace("_", "-")] = v
    return opts


def prune(c: Ctx, out: str | Path | None = "out", **over) -> list[str]:
    """A quick prune of the saved tiny-bert classifier (magnitude needs no calibration data)."""
    base = {"--model": c.assets.clf, "--method": "magnitude", "--sparsity": "0.5", "--data": c.assets.csv,
            "--eval-size": "8", "--calib-size": "8", "--calib-max-length": "16", "--max-length": "32",
            "--batch-size": "8", "--out": _in_ws(c, out)}
    return _flat("prune", _opts(base, over))


def _in_ws(c: Ctx, out: str | Path | None) -> str | Path | None:
    """A plain relative --out is a folder of the workspace; '.', '..', '~', '' and absolute paths stay as given
    (relative ones are then taken from the command's cwd, ws/cwd)."""
    if out is None or out == "" or str(out).startswith(("/", "~", ".")):
        return out
    return c.ws / out


def evaluate(c: Ctx, **over) -> list[str]:
    return _flat("evaluate", _opts({"--model": c.assets.clf, "--data": c.assets.csv, "--eval-size": "8",
                                    "--max-length": "32", "--batch-size": "8"}, over))


def sweep(c: Ctx, **over) -> list[str]:
    return _flat("sweep", _opts({"--model": c.assets.clf, "--methods": "magnitude", "--sparsities": "0.5",
                                 "--data": c.assets.csv, "--eval-size": "8", "--calib-size": "8",
                                 "--calib-data": c.assets.text,
                                 "--calib-max-length": "16", "--max-length": "32", "--batch-size": "8",
                                 "--out": c.out}, over))


def anatomy(c: Ctx, **over) -> list[str]:
    return _flat("anatomy", _opts({"--model": c.assets.clf, "--out": c.out, "--max-length": "32",
                                   "--no-figures": True}, over))


def redundancy(c: Ctx, **over) -> list[str]:
    return _flat("redundancy", _opts({"--model": "tiny-gpt2", "--task": "lm", "--text": c.assets.text,
                                      "--train-size": "4", "--eval-size": "4", "--analysis-size": "4",
                                      "--max-length": "16", "--batch-size": "4", "--no-figures": True,
                                      "--out": c.out}, over))


def figures(c: Ctx, *runs, **over) -> list[str]:
    argv = ["figures"]
    for r in runs:
        argv += ["--run", str(r)]
    return argv + _flat("", _opts({"--out": c.out}, over))[1:]


# --- setups --------------------------------------------------------------------------------------

def user_files(c: Ctx) -> None:
    """Files a user has beside the run: in the workspace, the cwd, a home folder."""
    c.write("cwd/notes.txt", "my notes")
    c.write("keep.txt", "keep me")
    c.write("home/.profile", "a home file")


def with_(*fns) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        user_files(c)
        for f in fns:
            f(c)
    return setup


def finished_run(kind: str, folder: str, name: str = "r.json"):
    def make(c: Ctx) -> None:
        from anatomy_prune.runfolder import RunFolder
        with RunFolder(c.ws / folder, kind, {"x": 1}) as rf:
            rf.write_json(name, {"v": 1})
    return make


def locked_by_another(c: Ctx):
    """Another writer holds --out's lock and has staged an output (the held context of a case)."""
    from anatomy_prune.runfolder import RunFolder

    @contextlib.contextmanager
    def hold():
        with RunFolder(c.out, "prune", {"other": True}) as rf:
            rf.write_json("metrics.json", {"first": True})
            yield
        assert json.loads((c.out / "metrics.json").read_text()) == {"first": True}  # the first commits
    return hold()


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], header_len: int | None = None) -> bytes:
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def damage(name: str, fn: Callable[[Path], None], src: str = "clf"):
    def setup(c: Ctx) -> None:
        user_files(c)
        m = c.copy_model("m", getattr(c.assets, src))
        fn(m)
    return setup


def meta(**changes):
    def fn(m: Path) -> None:
        d = json.loads((m / "anatomy_prune.json").read_text())
        for k, v in changes.items():
            if v is DELETE:
                d.pop(k, None)
            else:
                d[k] = v
        (m / "anatomy_prune.json").write_text(json.dumps(d))
    return fn


def truncate(m: Path) -> None:
    p = m / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def random_bytes(m: Path) -> None:
    import random
    (m / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))


def huge_header(m: Path) -> None:
    p = m / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + p.read_bytes()[8:])


def shape_lie(m: Path) -> None:
    (m / "model.safetensors").write_bytes(safetensors_bytes({"w": ("F32", [1 << 20, 1 << 20], b"\0" * 16)}))


def head_random(m: Path) -> None:
    (m / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def huge_config(m: Path) -> None:
    """A config.json that describes a model of 10^8-wide FFNs (about 77 GB) next to tiny weights."""
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] = 10 ** 8
    (m / "config.json").write_text(json.dumps(cfg))
    meta(ffn_widths=DELETE)(m)


EVIL = '''import pathlib
pathlib.Path(__file__).resolve().parent.parent.joinpath("PWNED").write_text("remote code ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
'''


def remote_code(saved: bool, known_type: bool = False):
    """A model folder whose config.json asks for custom code (auto_map); the code writes ws/PWNED."""
    def setup(c: Ctx) -> None:
        user_files(c)
        if known_type:
            m = c.copy_model("m")
            cfg = json.loads((m / "config.json").read_text())
            tok = json.loads((m / "tokenizer_config.json").read_text())
            tok.update(auto_map={"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]},
                       tokenizer_class="EvilTokenizer")
            (m / "tokenizer_config.json").write_text(json.dumps(tok))
        else:
            m = c.ws / "m"
            m.mkdir()
            cfg = {"model_type": "evil", "architectures": ["EvilModel"], "hidden_size": 8}
            (m / "model.safetensors").write_bytes(safetensors_bytes({"w": ("F32", [2], b"\0" * 8)}))
            if saved:
                (m / "anatomy_prune.json").write_text(json.dumps({"kind": "classifier", "format": 1}))
        cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "modeling_evil.py").write_text(EVIL)
        (m / "__init__.py").write_text("from . import modeling_evil\n")
    return setup


def plan_file(**changes):
    """A copy of the pruned run's plan.json with fields replaced: ws/plan.json."""
    def setup(c: Ctx) -> None:
        user_files(c)
        d = json.loads((c.assets.pruned / "plan.json").read_text())
        for k, v in changes.items():
            if k == "params_update":
                d["params"] = {**d.get("params", {}), **v}
            elif v is DELETE:
                d.pop(k, None)
            else:
                d[k] = v(d) if callable(v) else v
        c.write("plan.json", json.dumps(d))
    return setup


def plan_argv(c: Ctx, **over) -> list[str]:
    return prune(c, method=None, sparsity=None, plan=c.ws / "plan.json", **over)


NON_UTF8 = b"text,label\n\xff\xfe caf\xe9 review,1\nanother,0\n"


def figure_links(c: Ctx) -> None:
    """run/figures is a link to a folder outside the run; run/sub/figures is real and holds a link too."""
    user_files(c)
    secret = c.ws / "secret"
    secret.mkdir()
    (secret / "a.png").write_bytes(b"\x89PNG secret")
    run = c.ws / "run"
    (run / "sub" / "figures").mkdir(parents=True)
    (run / "figures").symlink_to(secret, target_is_directory=True)
    (run / "sub" / "figures" / "b.png").write_bytes(b"\x89PNG mine")
    (run / "sub" / "figures" / "c.png").symlink_to(secret / "a.png")


def only_b_png(c: Ctx) -> None:
    names = sorted(p.name for p in c.out.iterdir() if not p.name.startswith("."))
    assert names == ["run_sub_b.png"], names
    assert (c.out / "run_sub_b.png").read_bytes() == b"\x89PNG mine"


def readonly(c: Ctx) -> None:
    user_files(c)
    (c.ws / "ro").mkdir()
    (c.ws / "ro" / "theirs.txt").write_text("not mine")
    (c.ws / "ro").chmod(0o555)
    (c.ws / "ro_empty").mkdir()
    (c.ws / "ro_empty").chmod(0o555)


def no_staging_left(c: Ctx) -> None:
    assert not (c.out / ".anatomy-prune-staging").exists()


def sweep_with_crafted_resume(c: Ctx) -> None:
    """A finished sweep in ws/out, then a resume file (same kind and digest, so it is read) whose rows and
    plans carry path-like values; a rerun must write only inside --out."""
    user_files(c)
    from anatomy_prune.cli import main
    assert main(sweep(c, methods="magnitude,activation")) == 0
    marker = json.loads((c.out / ".anatomy-prune.json").read_text())
    results = json.loads((c.out / "results.json").read_text())
    plans = [json.loads(p.read_text()) for p in sorted((c.out / "plans").iterdir())]
    evil = "../../PWNED"
    rows = [dict(r, plan=evil, label=None, **{"../../x": 1}) for r in results]
    for p in plans:
        p.update(method=evil, base_model=evil, created=evil)
    rows = rows[:2]      # the dense row and the first point: the second point runs again
    resume = {"kind": "sweep", "digest": marker["digest"], "data": {"rows": rows, "plans": plans[:1]}}
    (c.out / ".anatomy-prune-resume.json").write_text(json.dumps(resume))


def crafted_resume_with_wrong_types(c: Ctx) -> None:
    """As above, and the finished point's metric is text: the resume file must be ignored (or the point
    run again), not end the sweep in a traceback after all its work."""
    sweep_with_crafted_resume(c)
    f = c.out / ".anatomy-prune-resume.json"
    d = json.loads(f.read_text())
    d["data"]["rows"][1]["accuracy"] = "abc"
    f.write_text(json.dumps(d))


def resumed(c: Ctx) -> None:
    s = json.loads((c.out / "sweep.json").read_text())
    assert s["resumed_after"] == 1
    assert sorted(p.name for p in (c.out / "plans").iterdir()) == ["00-magnitude.json", "01-activation.json"]
    assert not (c.ws / "PWNED").exists() and not (c.ws.parent / "PWNED").exists()


def pruned_run_of(src: str, max_length: str | None):
    def setup(c: Ctx) -> None:
        user_files(c)
        from anatomy_prune.cli import main
        argv = prune(c, model=getattr(c.assets, src), out="pruned", max_length=max_length)
        assert main(argv) == 0
    return setup


CASES: list[Case] = [
    # --- --out: no place for a run ---------------------------------------------------------------
    Case("out-dot", lambda c: prune(c, out="."), user_files, msg="current or a parent folder", no_load=True),
    Case("out-dotdot", lambda c: prune(c, out=".."), user_files, msg="current or a parent folder", no_load=True),
    Case("out-sub-dotdot", lambda c: prune(c, out="./sub/.."), with_(lambda c: (c.cwd / "sub").mkdir()),
         msg="current or a parent folder", no_load=True),
    Case("out-cwd-absolute", lambda c: prune(c, out=str(c.cwd)), user_files, msg="contains the current folder",
         no_load=True),
    Case("out-parent-of-cwd", lambda c: prune(c, out=str(c.ws)), user_files, msg="contains the current folder",
         no_load=True),
    Case("out-root", lambda c: prune(c, out="/"), user_files, msg="filesystem root", no_load=True, guard="/",
         golden="unsafe: the old code moves the entries of / aside (it moved /etc and /boot before failing on /proc)"),
    Case("out-home", lambda c: prune(c, out=str(c.ws / "home")), user_files, msg="home folder", no_load=True,
         env={"HOME": "{ws}/home"}),
    Case("out-tilde", lambda c: prune(c, out="~"), user_files, msg="home folder", no_load=True,
         env={"HOME": "{ws}/home"}),
    Case("out-empty", lambda c: prune(c, out=""), user_files, msg="empty", no_load=True),
    Case("out-symlink", lambda c: prune(c, out="link"),
         with_(lambda c: (c.ws / "real").mkdir(), lambda c: c.write("real/data.txt", "x"),
               lambda c: (c.ws / "link").symlink_to(c.ws / "real")), msg="symbolic link", no_load=True),
    Case("out-dangling-symlink", lambda c: prune(c, out="dangling"),
         with_(lambda c: (c.ws / "dangling").symlink_to(c.ws / "nowhere")), msg="symbolic link", no_load=True),
    Case("out-through-broken-link", lambda c: prune(c, out="dangling/sub"),
         with_(lambda c: (c.ws / "dangling").symlink_to(c.ws / "nowhere")), msg="broken symbolic link",
         no_load=True),
    Case("out-is-file", lambda c: prune(c, out="keep.txt"), user_files, msg="not a folder", no_load=True),
    Case("out-under-file", lambda c: prune(c, out="keep.txt/sub"), user_files, msg="not a folder", no_load=True),
    Case("out-not-empty", lambda c: prune(c, out="mine"), with_(lambda c: c.write("mine/notes.txt", "mine")),
         msg="not empty and was not written by anatomy-prune", no_load=True),
    Case("out-other-run", lambda c: prune(c, out="prev"), with_(finished_run("figures", "prev")),
         msg="holds a figures run", no_load=True),
    Case("out-damaged-marker", lambda c: prune(c, out="prev"),
         with_(lambda c: c.write("prev/.anatomy-prune.json", "\xff{garbage"), lambda c: c.write("prev/r.json", "{}")),
         msg="damaged", no_load=True, golden="no run markers before"),
    Case("out-staging-not-ours", lambda c: prune(c, out="prev", force=True),
         with_(finished_run("figures", "prev"), lambda c: c.write("prev/.anatomy-prune-staging/mine.txt", "mine")),
         msg="was not made by anatomy-prune", no_load=True, golden="no --force before"),
    Case("out-lock-is-symlink", lambda c: prune(c, out="prev", force=True),
         with_(finished_run("figures", "prev"), lambda c: c.write("target.txt", "t"),
               lambda c: (c.ws / "prev" / ".anatomy-prune.lock").unlink(),
               lambda c: (c.ws / "prev" / ".anatomy-prune.lock").symlink_to(c.ws / "target.txt")),
         msg="not a lock file", no_load=True, golden="no --force before"),
    Case("out-locked-by-another-run", lambda c: prune(c, force=True), user_files, hold=locked_by_another,
         msg="another anatomy-prune run is writing", no_load=True, golden="no lock before"),
    Case("out-force-clash-with-user-file", lambda c: prune(c, out="mine", force=True),
         with_(lambda c: c.write("mine/metrics.json", "the user's own metrics")),
         msg="exists and was not written by anatomy-prune", golden="no --force before"),
    Case("out-force-adds-beside-user-files", lambda c: prune(c, out="mine", force=True),
         with_(lambda c: c.write("mine/notes.txt", "mine")), rc=0, out="mine", golden="no --force before"),
    Case("out-readonly-parent", lambda c: prune(c, out="ro/sub"), readonly,
         msg="cannot create --out", no_load=True, unprivileged=True),
    Case("out-readonly-folder", lambda c: prune(c, out="ro_empty"), readonly,
         msg="cannot write to --out", no_load=True, unprivileged=True),
    # --- figures -----------------------------------------------------------------------------------
    Case("figures-out-is-file", lambda c: figures(c, c.assets.pruned, out=c.ws / "keep.txt"), user_files,
         msg="not a folder", no_load=True),
    Case("figures-out-dot", lambda c: figures(c, c.assets.pruned, out="."), user_files,
         msg="current or a parent folder", no_load=True),
    Case("figures-links-not-followed", lambda c: figures(c, c.ws / "run"), figure_links, rc=0, after=only_b_png),
    Case("figures-run-is-symlink", lambda c: figures(c, c.ws / "runlink"),
         with_(lambda c: (c.ws / "runlink").symlink_to(c.assets.pruned)), msg="symbolic link", no_load=True),
    Case("figures-damaged-anatomy-results", lambda c: figures(c, c.ws / "run"),
         with_(lambda c: c.write("run/figures/x.png", b"\x89PNG"),
               lambda c: c.write("run/layer_similarity.json", "[1,")),
         msg="layer_similarity.json", no_load=True),
    # --- models ------------------------------------------------------------------------------------
    Case("model-unknown-alias", lambda c: evaluate(c, model="tiny-bret"), user_files, msg="tiny-bret", no_load=True),
    Case("model-hub-id-offline", lambda c: evaluate(c, model="someone/no-such-model"), user_files,
         msg="HF_HUB_OFFLINE", no_load=True, env={"HF_HUB_OFFLINE": "1"}),
    Case("model-remote-code-plain-folder", lambda c: evaluate(c, model=c.ws / "m"), remote_code(saved=False),
         msg="custom code|cannot|not supported", no_load=True),
    Case("model-remote-code-saved-folder", lambda c: evaluate(c, model=c.ws / "m"), remote_code(saved=True),
         msg="custom code|cannot|not supported", no_load=True),
    Case("model-remote-code-tokenizer", lambda c: evaluate(c, model=c.ws / "m"),
         remote_code(saved=True, known_type=True), rc=0),
    Case("model-pickle-only", lambda c: evaluate(c, model=c.ws / "m"),
         with_(lambda c: c.write("m/config.json", (c.assets.clf / "config.json").read_text()),
               lambda c: c.write("m/pytorch_model.bin", b"PK\x03\x04 pickled")), msg="safetensors only",
         no_load=True),
    Case("model-is-file", lambda c: evaluate(c, model=c.ws / "keep.txt"), user_files, msg="is a file",
         no_load=True),
    Case("st-truncated", lambda c: evaluate(c, model=c.ws / "m"), damage("st", truncate),
         msg="model.safetensors.*(truncated|outside)", no_load=True),
    Case("st-random-bytes", lambda c: evaluate(c, model=c.ws / "m"), damage("st", random_bytes),
         msg="model.safetensors.*(damaged header|not JSON)", no_load=True),
    Case("st-oversized-header", lambda c: evaluate(c, model=c.ws / "m"), damage("st", huge_header),
         msg="damaged header", no_load=True),
    Case("st-empty", lambda c: evaluate(c, model=c.ws / "m"),
         damage("st", lambda m: (m / "model.safetensors").write_bytes(b"")), msg="truncated", no_load=True),
    Case("st-shape-lie", lambda c: evaluate(c, model=c.ws / "m"), damage("st", shape_lie),
         msg="bytes for shape", no_load=True),
    Case("st-head-damaged", lambda c: evaluate(c, model=c.ws / "m"), damage("st", head_random),
         msg="head.safetensors"),
    Case("meta-widths-disagree", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(ffn_widths=[20, 20, 20])),
         msg="disagree with the weights"),
    Case("meta-widths-count", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(ffn_widths=[37, 37])),
         msg="2 FFN widths for 3 layers", no_load=True),
    Case("meta-widths-huge", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(ffn_widths=[10 ** 12] * 3)),
         msg="exceed", no_load=True),
    Case("meta-widths-wrong-type", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(ffn_widths=["a", 1, 2])),
         msg="ffn_widths", no_load=True),
    Case("meta-dropout-lots", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(dropout="lots")),
         msg="'dropout' must be a number", no_load=True),
    Case("meta-kind-unknown", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(kind="banana")),
         msg="kind 'banana'", no_load=True),
    Case("meta-not-utf8", lambda c: evaluate(c, model=c.ws / "m"),
         damage("m", lambda m: (m / "anatomy_prune.json").write_bytes(b"\xff\xfe{}")), msg="not UTF-8", no_load=True),
    Case("meta-max-length-text", lambda c: evaluate(c, model=c.ws / "m"), damage("m", meta(max_length="long")),
         msg="max_length", no_load=True),
    Case("model-no-config", lambda c: evaluate(c, model=c.ws / "m"),
         damage("m", lambda m: (m / "config.json").unlink()), msg="config.json is missing", no_load=True),
    Case("model-config-not-json", lambda c: evaluate(c, model=c.ws / "m"),
         damage("m", lambda m: (m / "config.json").write_text("{")), msg="config.json", no_load=True),
    Case("model-config-huge", lambda c: evaluate(c, model=c.ws / "m"), damage("m", huge_config),
         msg="config.json", no_load=True),
    # --- plans -------------------------------------------------------------------------------------
    Case("plan-keep-text", plan_argv, plan_file(keep=lambda d: [["a"]] + d["keep"][1:]), msg="whole numbers",
         no_load=True),
    Case("plan-keep-float-half", plan_argv, plan_file(keep=lambda d: [[0.5]] + d["keep"][1:]), msg="whole numbers",
         no_load=True),
    Case("plan-keep-float", plan_argv, plan_file(keep=lambda d: [[1.7, 3]] + d["keep"][1:]), msg="whole numbers",
         no_load=True),
    Case("plan-keeps-nothing", plan_argv, plan_file(keep=lambda d: [[] for _ in d["keep"]]), msg="keeps no neuron",
         no_load=True),
    Case("plan-id-out-of-range", plan_argv, plan_file(keep=lambda d: [[99]] + d["keep"][1:]), msg=r"in \[0, 37\)",
         no_load=True),
    Case("plan-ridge-text", lambda c: plan_argv(c, compensate=True),
         plan_file(params_update={"compensate": True, "ridge": "x"}), msg="ridge", no_load=True),
    Case("plan-widths-huge", plan_argv, plan_file(widths=[1 << 40] * 3), msg="at most", no_load=True),
    Case("plan-too-many-layers", plan_argv, plan_file(widths=[37] * 5000, keep=[[0]] * 5000), msg="layers",
         no_load=True),
    Case("plan-other-model", plan_argv, plan_file(widths=[10] * 3, keep=[[0, 1]] * 3), msg="does not fit"),
    Case("plan-not-json", plan_argv, with_(lambda c: c.write("plan.json", "{")), msg="not valid JSON", no_load=True),
    Case("plan-not-utf8", plan_argv, with_(lambda c: c.write("plan.json", b"\xff\xfe")), msg="not UTF-8", no_load=True),
    Case("plan-deeply-nested", plan_argv, with_(lambda c: c.write("plan.json", "[" * 100_000 + "]" * 100_000)),
         msg="plan", no_load=True),
    Case("plan-is-folder", plan_argv, with_(lambda c: (c.ws / "plan.json").mkdir()), msg="plan", no_load=True),
    Case("plan-and-method", lambda c: prune(c, plan=c.ws / "plan.json"), plan_file(), msg="either", no_load=True),
    # --- data --------------------------------------------------------------------------------------
    Case("data-csv-not-utf8", lambda c: evaluate(c, data=c.ws / "bad.csv"),
         with_(lambda c: c.write("bad.csv", NON_UTF8)),
         msg="not UTF-8", no_load=True),
    Case("data-jsonl-not-utf8", lambda c: evaluate(c, data=c.ws / "bad.jsonl"),
         with_(lambda c: c.write("bad.jsonl", b'{"text": "\xff", "label": 1}\n')), msg="not UTF-8", no_load=True),
    Case("data-missing", lambda c: evaluate(c, data=c.ws / "none.csv"), user_files, msg="not found", no_load=True),
    Case("data-wrong-suffix", lambda c: evaluate(c, data=c.ws / "keep.txt"), user_files, msg="must end in",
         no_load=True),
    Case("data-no-label-column", lambda c: evaluate(c, data=c.ws / "d.csv"),
         with_(lambda c: c.write("d.csv", "text,score\ngood,1\n")), msg="'text' and 'label'", no_load=True),
    Case("inputs-not-utf8", lambda c: anatomy(c, inputs=c.ws / "bad.txt"),
         with_(lambda c: c.write("bad.txt", b"\xff\xfe x\n")),
         msg="not UTF-8", no_load=True),
    Case("text-not-utf8", lambda c: redundancy(c, text=c.ws / "bad.txt"),
         with_(lambda c: c.write("bad.txt", b"\xff\xfe x\n")),
         msg="not UTF-8", golden="--text / task options differ"),
    Case("calib-data-not-utf8", lambda c: prune(c, method="activation", calib_data=c.ws / "bad.txt"),
         with_(lambda c: c.write("bad.txt", b"\xff\xfe x\n")), msg="not UTF-8"),
    # --- options -----------------------------------------------------------------------------------
    Case("max-length-roberta-129", lambda c: evaluate(c, model=c.assets.roberta, max_length="129"), user_files,
         msg="128 usable positions", golden="no tiny-roberta before"),
    Case("max-length-roberta-128", lambda c: evaluate(c, model=c.assets.roberta, max_length="128"), user_files,
         rc=0, golden="no tiny-roberta before"),
    Case("max-length-mpnet-129", lambda c: evaluate(c, model=c.assets.mpnet, max_length="129"), user_files,
         msg="128 usable positions", golden="no tiny-mpnet before"),
    Case("max-length-mpnet-128", lambda c: evaluate(c, model=c.assets.mpnet, max_length="128"), user_files,
         rc=0, golden="no tiny-mpnet before"),
    Case("max-length-zero", lambda c: evaluate(c, max_length="0"), user_files, msg="--max-length"),
    Case("multiple-of-negative", lambda c: prune(c, multiple_of="-4"), user_files, msg="--multiple-of"),
    Case("eval-size-negative", lambda c: evaluate(c, eval_size="-3"), user_files, msg="--eval-size", no_load=True),
    Case("batch-size-zero", lambda c: evaluate(c, batch_size="0"), user_files, msg="--batch-size"),
    Case("device-cuda-absent", lambda c: prune(c, device="cuda"), user_files, msg="CUDA", no_load=True),
    Case("device-unknown", lambda c: evaluate(c, device="toaster"), user_files, msg="--device", no_load=True),
    Case("preset-unknown", lambda c: ["finetune", "--preset", "nope", "--out", str(c.out)], user_files,
         msg="--preset", no_load=True, golden="no --preset before"),
    Case("seeds-zero", lambda c: sweep(c, seeds="0"), user_files, msg="--seeds", no_load=True,
         golden="no --seeds before"),
    Case("sparsity-above-one", lambda c: prune(c, sparsity="1.5"), user_files, msg="sparsity", no_load=True),
    Case("sparsity-nan", lambda c: prune(c, sparsity="nan"), user_files, msg="sparsity", no_load=True),
    Case("sparsity-negative", lambda c: prune(c, sparsity="-0.1"), user_files, msg="sparsity", no_load=True),
    Case("sparsities-not-numbers", lambda c: sweep(c, sparsities="0.1,lots"), user_files, msg="--sparsities",
         no_load=True),
    Case("threshold-not-a-number", lambda c: anatomy(c, threshold="high"), user_files, msg="--threshold",
         no_load=True),
    Case("threshold-out-of-range", lambda c: anatomy(c, threshold="5"), user_files, msg="--threshold", no_load=True),
    Case("split-unknown", lambda c: evaluate(c, split="nope"), user_files, msg="--split", no_load=True,
         golden="no --split before"),
    Case("method-unknown", lambda c: prune(c, method="psychic"), user_files, msg="psychic", no_load=True),
    Case("mode-unknown", lambda c: prune(c, mode="banana"), user_files, msg="banana", no_load=True),
    Case("calib-size-zero", lambda c: prune(c, method="activation", calib_size="0"), user_files, msg="--calib-size"),
    Case("focus-not-numbers", lambda c: prune(c, method="strategy", focus="1,x"), user_files, msg="--focus",
         no_load=True),
    Case("config-alpha-text", lambda c: sweep(c, config=c.ws / "grid.toml"),
         with_(lambda c: c.write("grid.toml", '[[row]]\nmethod = "strategy"\nalpha = "high"\n')), msg="alpha",
         no_load=True),
    Case("config-not-toml", lambda c: sweep(c, config=c.ws / "grid.toml"),
         with_(lambda c: c.write("grid.toml", "[[row]\nmethod = \n")), msg="not valid TOML", no_load=True),
    Case("config-not-utf8", lambda c: sweep(c, config=c.ws / "grid.toml"),
         with_(lambda c: c.write("grid.toml", b"[[row]]\nmethod = \"\xff\"\n")), msg="not UTF-8", no_load=True),
    Case("config-focus-depth-text", lambda c: sweep(c, config=c.ws / "grid.toml"),
         with_(lambda c: c.write("grid.toml", 'focus_depth = "deep"\n[[row]]\nmethod = "strategy"\nalpha = 1.0\n')),
         msg="focus_depth", no_load=True),
    Case("evaluate-json-is-folder", lambda c: evaluate(c, json=c.ws / "jsondir"),
         with_(lambda c: (c.ws / "jsondir").mkdir()), msg="--json.*is a folder", no_load=True),
    Case("evaluate-json-folder-missing", lambda c: evaluate(c, json=c.ws / "none" / "m.json"), user_files,
         msg="--json.*does not exist", no_load=True),
    Case("sweep-report-is-folder", lambda c: sweep(c, report=c.ws / "repdir"),
         with_(lambda c: (c.ws / "repdir").mkdir()), msg="--report.*is a folder", no_load=True),
    Case("redundancy-analysis-size-zero", lambda c: redundancy(c, analysis_size="0"), user_files,
         msg="--analysis-size", no_load=True, golden="--text / task options differ"),
    Case("finepruning-steps-zero", lambda c: ["finepruning", "--model", "tiny-gpt2", "--method", "magnitude",
                                              "--sparsity", "0.5", "--steps", "0", "--out", str(c.out)],
         user_files, msg="--steps", no_load=True),
    Case("finetune-lr-nan", lambda c: ["finetune", "--model", "tiny-bert", "--data", str(c.assets.csv), "--lr",
                                       "nan", "--out", str(c.out)], user_files, msg="--lr", no_load=True),
    Case("inputs-imdb-zero", lambda c: anatomy(c, inputs="imdb:0"), user_files, msg="--inputs", no_load=True),
    # --- runs that succeed on hostile-but-legal input -------------------------------------------
    Case("sweep-resume-with-path-like-values", lambda c: sweep(c, methods="magnitude,activation"),
         sweep_with_crafted_resume, rc=0, after=resumed, golden="resume files differ before"),
    Case("sweep-resume-with-wrong-types", lambda c: sweep(c, methods="magnitude,activation"),
         crafted_resume_with_wrong_types, rc=0, golden="resume files differ before"),
    Case("evaluate-what-prune-evaluated", lambda c: evaluate(c, model=c.ws / "pruned", max_length=None),
         pruned_run_of("clf", None), rc=0, out="pruned"),
    Case("evaluate-what-prune-evaluated-roberta-128", lambda c: evaluate(c, model=c.ws / "pruned", max_length=None),
         pruned_run_of("roberta", "128"), rc=0, out="pruned", golden="no tiny-roberta before"),
]


# --- running a case --------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    rc: int | None
    err: str
    built: int                       # models built (PreTrainedModel.__init__ calls)
    traceback: bool
    seconds: float


BOOT = f"""
import sys, transformers
_init = transformers.PreTrainedModel.__init__
def _probe(self, *a, **k):
    import torch
    if torch.empty(()).device.type != "meta":  # a size check on the meta device allocates nothing
        print({PROBE!r}, file=sys.stderr, flush=True)
    _init(self, *a, **k)
transformers.PreTrainedModel.__init__ = _probe
from anatomy_prune.cli import main
sys.argv[0] = "anatomy-prune"
raise SystemExit(main(sys.argv[1:]))
"""


def case_env(c: Ctx, case: Case) -> dict:
    env = {k: v.format(ws=c.ws) for k, v in case.env.items()}
    env.setdefault("XDG_CACHE_HOME", REAL_CACHE)
    return env


def run_subprocess(argv: list[str], cwd: Path, env: dict, src: Path | None = None, prefix: list[str] = (),
                   timeout: float = 300) -> Result:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONDONTWRITEBYTECODE": "1", **env}
    if src is not None:
        full["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    p = subprocess.run([*prefix, sys.executable, "-c", BOOT, *argv], cwd=cwd, env=full, capture_output=True,
                       text=True, timeout=timeout, errors="replace", preexec_fn=_limit_memory)
    return Result(p.returncode, p.stderr, p.stderr.count(PROBE), "Traceback" in p.stderr,
                  time.perf_counter() - t0)


MEMORY_LIMIT = 10 << 30   # address space of a case's subprocess: a huge allocation fails instead of swapping
HEADROOM = 6 << 30        # in-process: this much above what the test process already maps


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))


@contextlib.contextmanager
def memory_guard() -> Iterator[None]:
    """A hostile input that slips past the checks must not take the machine's memory (the OOM killer may pick
    another process): the address space is capped for the duration of an in-process case."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        yield
        return
    limit = mapped + HEADROOM if hard == resource.RLIM_INFINITY else min(hard, mapped + HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def count_builds() -> Iterator[list]:
    import torch
    import transformers
    calls: list = []
    init = transformers.PreTrainedModel.__init__

    def probe(self, *a, **k):
        if torch.empty(()).device.type != "meta":  # a size check on the meta device allocates nothing
            calls.append(type(self).__name__)
        init(self, *a, **k)
    transformers.PreTrainedModel.__init__ = probe
    try:
        yield calls
    finally:
        transformers.PreTrainedModel.__init__ = init


def run_inprocess(argv: list[str], cwd: Path, env: dict, capsys) -> Result:
    from anatomy_prune.cli import main

    saved = {k: os.environ.get(k) for k in env}
    here = os.getcwd()
    capsys.readouterr()
    t0 = time.perf_counter()
    tb = False
    try:
        os.environ.update(env)
        os.chdir(cwd)
        with memory_guard(), count_builds() as built:
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 2
            except Exception:  # noqa: BLE001 - a traceback is what the case checks for
                import traceback
                rc, tb = None, True
                sys.stderr.write(traceback.format_exc())
    finally:
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    err = capsys.readouterr().err
    return Result(rc, err, len(built), tb or "Traceback" in err, time.perf_counter() - t0)


def judge(case: Case, c: Ctx, res: Result, before: dict, after: dict) -> dict[str, bool | str]:
    """What the promise asks of this case's run: {check: ok} (a str: what went wrong)."""
    lines = error_lines(res.err)
    out = {"rc": res.rc == case.rc or f"exit {res.rc}, expected {case.rc}",
           "traceback": not res.traceback or "a traceback on stderr"}
    if case.rc == 0:
        out["one line"] = not lines or f"stderr: {lines[:3]}"
        problems = unchanged_except_out(before, after, c.ws / (case.out or "out"))
    else:
        out["one line"] = (len(lines) == 1 and lines[0].startswith("anatomy-prune")) or f"stderr: {lines[:4]}"
        problems = diff(before, after)
    out["unchanged"] = not problems or "; ".join(problems[:4])
    if case.no_load:
        out["no load"] = res.built == 0 or f"{res.built} models built before the refusal"
    if case.msg and case.rc != 0:
        out["message"] = bool(lines and re.search(case.msg, lines[-1])) or f"message: {lines[-1:]}"
    return out


def make_ws(base: Path) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=base))
    (ws / "cwd").mkdir()
    return ws


def _chmod_back(ws: Path) -> None:
    for dirpath, dirnames, _ in os.walk(ws):
        for d in dirnames:
            p = Path(dirpath) / d
            if not p.is_symlink():
                p.chmod(0o755)


def unprivileged_prefix() -> list[str] | None:
    """How to run a command that permissions apply to: [] when not root; as root, setpriv without the
    capabilities that override file permissions (None when that is not possible here)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] if setpriv else None


def run_case(case: Case, assets: Assets, base: Path, capsys=None, src: Path | None = None) -> tuple[dict, Result]:
    """Set up, snapshot, run (in-process with capsys, else a subprocess on `src`), snapshot, judge."""
    prefix = unprivileged_prefix() if case.unprivileged else []
    if prefix is None:
        pytest.skip("root without setpriv: permissions cannot be tested")
    if case.guard is not None:
        from anatomy_prune import UserError
        from anatomy_prune.runfolder import check_out_path
        try:
            check_out_path(case.guard)
        except UserError:
            pass
        else:
            raise AssertionError(f"{case.id}: check_out_path accepts {case.guard!r}; not running the CLI on it")
    ws = make_ws(base)
    try:
        c = Ctx(ws, assets)
        if case.setup:
            case.setup(c)
        env = case_env(c, case)
        argv = [str(a) for a in case.argv(c)]
        hold = case.hold(c) if case.hold else contextlib.nullcontext()
        with hold:
            before = snapshot(ws)
            if capsys is None or prefix:
                res = run_subprocess(argv, c.cwd, env, src=src or ROOT / "src", prefix=prefix)
            else:
                res = run_inprocess(argv, c.cwd, env, capsys)
            after = snapshot(ws)
        verdict = judge(case, c, res, before, after)
        if case.after and all(v is True for v in verdict.values()):
            try:
                case.after(c)
            except AssertionError as exc:
                verdict["after"] = f"after-check: {exc}"
            else:
                verdict["after"] = True
        return verdict, res
    finally:
        _chmod_back(ws)


# --- fixtures and tests ----------------------------------------------------------------------------

def build_assets(root: Path) -> Assets:
    import csv

    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_classifier

    from anatomy_prune.cli import main
    from anatomy_prune.models.saved import save_model

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for alias, name in (("tiny-bert", "clf"), ("tiny-roberta", "roberta"), ("tiny-mpnet", "mpnet")):
        paths[name] = save_model(make_classifier(alias), root / name)
    data = root / "reviews.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((f"{t} (review {i})", i % 2) for i, t in enumerate(TEXTS * 6))
    words = "the film was good bad long short funny dull and I liked hated every minute of its story".split()
    g = torch.Generator().manual_seed(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(words[i] for i in torch.randint(len(words), (24,), generator=g).tolist())
                              for _ in range(40)) + "\n")
    assets = Assets(root, paths["clf"], paths["roberta"], paths["mpnet"], data, text, root / "pruned")
    ctx = Ctx(root, assets)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(prune(ctx, out=str(root / "pruned"))) == 0
    return assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Iterator[Assets]:
    a = build_assets(tmp_path_factory.mktemp("hostile-assets"))
    before = snapshot(a.root)
    yield a
    assert not diff(before, snapshot(a.root)), "a case wrote into the shared inputs"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                                if c.xfail else []) for c in CASES])
def test_hostile_input(case: Case, assets: Assets, tmp_path: Path, capsys) -> None:
    if case.id == "device-cuda-absent":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
    verdict, res = run_case(case, assets, tmp_path, capsys)
    bad = {k: v for k, v in verdict.items() if v is not True}
    assert not bad, f"{case.id}: {bad}\n--- stderr ---\n{res.err[-3000:]}"


def test_enough_cases() -> None:
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


# --- signals: a killed run leaves nothing a rerun trips over; an interrupted sweep resumes ----------

def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "XDG_CACHE_HOME": REAL_CACHE}
    return subprocess.Popen([sys.executable, "-m", "anatomy_prune", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.perf_counter()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path.name} appeared: "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def test_sigkill_mid_run_then_rerun_succeeds(assets: Assets, tmp_path: Path, capsys) -> None:
    """kill -9 while prune works (its staging folder exists): the rerun with the same settings succeeds,
    removes the stale staging folder, and nothing appears beside --out."""
    ws = make_ws(tmp_path)
    c = Ctx(ws, assets)
    user_files(c)
    argv = prune(c)
    before = snapshot(ws)
    proc = _spawn(argv, c.cwd)
    _wait_for(c.out / ".anatomy-prune-staging" / ".staging-of-anatomy-prune", proc)
    proc.kill()
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert (c.out / ".anatomy-prune-staging").is_dir()           # what a kill leaves: staging, marker, lock
    assert not unchanged_except_out(before, snapshot(ws), c.out)
    res = run_inprocess(argv, c.cwd, {"XDG_CACHE_HOME": REAL_CACHE}, capsys)
    assert res.rc == 0 and not res.traceback, res.err[-2000:]
    no_staging_left(c)
    assert {p.name for p in c.out.iterdir() if not p.name.startswith(".")} == {"plan.json", "model", "metrics.json"}
    assert json.loads((c.out / ".anatomy-prune.json").read_text())["status"] == "complete"
    assert not unchanged_except_out(before, snapshot(ws), c.out)


def test_sigint_during_sweep_exits_130_and_the_rerun_resumes(assets: Assets, tmp_path: Path, capsys) -> None:
    ws = make_ws(tmp_path)
    c = Ctx(ws, assets)
    user_files(c)
    argv = sweep(c, sparsities="0.2,0.4,0.6,0.8", eval_size="16", batch_size="4")
    before = snapshot(ws)
    proc = _spawn(argv, c.cwd)
    _wait_for(c.out / ".anatomy-prune-resume.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("anatomy-prune sweep") and "Traceback" not in err, lines
    assert not unchanged_except_out(before, snapshot(ws), c.out)
    assert not (c.out / ".anatomy-prune-staging").exists()
    assert not (c.out / "results.json").exists()                  # nothing half-written
    done = len(json.loads((c.out / ".anatomy-prune-resume.json").read_text())["data"]["plans"])
    assert 1 <= done < 4
    res = run_inprocess(argv, c.cwd, {"XDG_CACHE_HOME": REAL_CACHE}, capsys)
    assert res.rc == 0 and not res.traceback, res.err[-2000:]
    summary = json.loads((c.out / "sweep.json").read_text())
    assert summary["resumed_after"] >= done                       # fewer points evaluated the second time
    assert len(json.loads((c.out / "results.json").read_text())) == 5
    assert not (c.out / ".anatomy-prune-resume.json").exists()
    assert not unchanged_except_out(before, snapshot(ws), c.out)
