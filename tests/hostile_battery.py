"""A held-out battery of hostile inputs (issue 23): cases of the classes the suite tests, but not the suite's
own cases. Run it against a source tree and read the table:

    .venv/bin/python tests/hostile_battery.py                      # this tree
    .venv/bin/python tests/hostile_battery.py --src /tmp/before/src

Each case runs the CLI in a subprocess (the tree's src on PYTHONPATH) after its setup, with the checks of
tests/test_hostile.py: exit status, one line on stderr, no traceback, nothing outside --out changed, nothing
lost (the user's files and a killed run's folder), and for killed commits, that the rerun recovers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
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
from test_hostile import DELETE, Case, evaluate, figures, meta, prune, sweep, user_files, with_  # noqa: E402

SRC = [HERE.parent / "src"]   # the tree under test (set by main)

# --- a commit killed at its k-th rename ---------------------------------------------------------------

KILL_BOOT = """
import os, signal, sys
from anatomy_prune import runfolder as _rf
_k, _how = int(os.environ["BATTERY_KILL_AT"]), os.environ["BATTERY_KILL_HOW"]
_state = {"on": False, "n": 0}
_exit = _rf.RunFolder.__exit__
def _exit_probe(self, *a):
    _state["on"] = a[0] is None
    return _exit(self, *a)
_rf.RunFolder.__exit__ = _exit_probe
def _wrap(fn):
    def inner(*a, **k):
        if _state["on"]:
            _state["n"] += 1
            if _state["n"] == _k:
                if _how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt
        return fn(*a, **k)
    return inner
os.rename, os.replace = _wrap(os.rename), _wrap(os.replace)
from anatomy_prune.cli import main
sys.argv[0] = "anatomy-prune"
raise SystemExit(main(sys.argv[1:]))
"""


def killed(k: int, how: str, first: dict | None = None, done_before: bool = False):
    """Setup: (optionally a finished prune, then) a prune whose commit dies at its k-th rename."""
    def setup(c: th.Ctx) -> None:
        user_files(c)
        env = {**os.environ, "PYTHONPATH": str(SRC[0]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": "2", "BATTERY_KILL_AT": str(k), "BATTERY_KILL_HOW": how,
               "XDG_CACHE_HOME": th.REAL_CACHE}
        if done_before:
            r = subprocess.run([sys.executable, "-m", "anatomy_prune", *map(str, prune(c))], cwd=c.cwd,
                               env={k2: v for k2, v in env.items() if not k2.startswith("BATTERY")},
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-500:]
        argv = prune(c, **(first or {}))
        subprocess.run([sys.executable, "-c", KILL_BOOT, *map(str, argv)], cwd=c.cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return setup


def complete_run(c: th.Ctx) -> None:
    m = json.loads((c.out / ".anatomy-prune.json").read_text())
    assert m["status"] == "complete", m
    names = {p.name for p in c.out.iterdir() if not p.name.startswith(".")}
    assert names == {"plan.json", "model", "metrics.json"}, names
    assert not (c.out / ".anatomy-prune-staging").exists()
    json.loads((c.out / "metrics.json").read_text())


def no_tmp_beside(c: th.Ctx) -> None:
    left = [p.name for p in c.ws.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]
    assert not left, left
    json.loads((c.ws / "res2.json").read_text())


def json_killed(c: th.Ctx) -> None:
    """An evaluate whose --json write is killed at its first rename (the temporary file is written)."""
    user_files(c)
    env = {**os.environ, "PYTHONPATH": str(SRC[0]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "BATTERY_KILL_AT": "1", "BATTERY_KILL_HOW": "kill", "XDG_CACHE_HOME": th.REAL_CACHE}
    boot = KILL_BOOT.replace('_state = {"on": False, "n": 0}', '_state = {"on": True, "n": 0}')
    subprocess.run([sys.executable, "-c", boot, *map(str, evaluate(c, json=c.ws / "res.json"))], cwd=c.cwd,
                   env=env, capture_output=True, text=True, timeout=300)


# --- special files --------------------------------------------------------------------------------------

def fifo(name: str):
    def make(c: th.Ctx) -> None:
        user_files(c)
        os.mkfifo(c.ws / name)
    return make


def chardev(name: str):
    def make(c: th.Ctx) -> None:
        user_files(c)
        if os.geteuid() == 0:
            os.mknod(c.ws / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
        else:
            os.mkfifo(c.ws / name)
    return make


def sock(name: str):
    def make(c: th.Ctx) -> None:
        user_files(c)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(c.ws / name))
        s.close()
    return make


def link_out(name: str):
    def make(c: th.Ctx) -> None:
        user_files(c)
        (c.ws / "outside").mkdir()
        (c.ws / "outside" / "theirs.json").write_text("theirs")
        (c.ws / name).symlink_to(c.ws / "outside" / "theirs.json")
    return make


# --- model folders ----------------------------------------------------------------------------------

def st_edit(fn, src: str = "clf", plain: bool = False):
    """Copy a saved model (plain: without anatomy-prune's metadata and head: a save_pretrained folder) and
    change its weights with fn(dict of tensors) -> dict of tensors."""
    def setup(c: th.Ctx) -> None:
        from safetensors.torch import load_file, save_file
        user_files(c)
        m = c.copy_model("m", getattr(c.assets, src))
        if plain:
            (m / "anatomy_prune.json").unlink()
            (m / "head.safetensors").unlink()
        if fn is not None:
            t = load_file(m / "model.safetensors")
            save_file(fn(t), m / "model.safetensors", metadata={"format": "pt"})
    return setup


def _first_float(t: dict) -> str:
    return next(k for k, v in t.items() if v.is_floating_point() and v.dim() == 2)


def as_int32(t):
    import torch
    k = _first_float(t)
    t[k] = t[k].to(torch.int32)
    return t


def as_complex(t):
    import torch
    k = _first_float(t)
    t[k] = t[k].to(torch.complex64)
    return t


def plain_folder(edit=None, cfg: dict | None = None):
    def setup(c: th.Ctx) -> None:
        st_edit(edit, plain=True)(c)
        if cfg:
            config(**cfg)(c.ws / "m")
    return setup


def trailing(m: Path) -> None:
    with (m / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 64)


def st_dir(m: Path) -> None:
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").mkdir()


def second_file(m: Path) -> None:
    """model-extra.safetensors holds a (zeroed) copy of one tensor: it must not override the declared one."""
    from safetensors.torch import load_file, save_file
    t = load_file(m / "model.safetensors")
    k = _first_float(t)
    save_file({k: t[k] * 0}, m / "model-extra.safetensors")


def config(**changes):
    def fn(m: Path) -> None:
        cfg = json.loads((m / "config.json").read_text())
        for k, v in changes.items():
            if v is DELETE:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (m / "config.json").write_text(json.dumps(cfg).replace('"__NaN__"', "NaN").replace('"__Inf__"', "Infinity"))
    return fn


def small_vocab(m: Path) -> None:
    """A config and embedding table of 1000 ids beside a 30522-id tokenizer."""
    from safetensors.torch import load_file, save_file
    t = load_file(m / "model.safetensors")
    k = next(k for k in t if "word_embeddings" in k)
    t[k] = t[k][:1000].contiguous()
    save_file(t, m / "model.safetensors", metadata={"format": "pt"})
    config(vocab_size=1000)(m)


def index_outside(m: Path) -> None:
    (m.parent / "evil.safetensors").write_bytes((m / "model.safetensors").read_bytes())
    from safetensors import safe_open
    with safe_open(m / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../evil.safetensors" for k in keys}}))


def damage(fn, src: str = "clf"):
    return th.damage("x", fn, src)


def loop(c: th.Ctx) -> None:
    user_files(c)
    (c.ws / "loop").symlink_to(c.ws / "loop")


def bom_csv(c: th.Ctx) -> None:
    user_files(c)
    c.write("bom.csv", b"\xef\xbb\xbf" + c.assets.csv.read_bytes())


def spaced_run(c: th.Ctx) -> None:
    user_files(c)
    import shutil
    shutil.copytree(c.assets.pruned, c.ws / "my run")


LONG = "a" * 300

CASES: list[Case] = [
    # 1. killed commits: the rerun (or --force) recovers
    *[Case(f"kill9-commit-{k}-rerun", lambda c: prune(c), killed(k, "kill"), rc=0, after=complete_run)
      for k in (1, 2, 3, 4)],
    *[Case(f"ctrlc-commit-{k}-rerun", lambda c: prune(c), killed(k, "int"), rc=0, after=complete_run)
      for k in (2, 3)],
    Case("kill9-commit-2-force-other", lambda c: prune(c, sparsity="0.3", force=True), killed(2, "kill"), rc=0,
         after=complete_run),
    Case("kill9-replace-2-force", lambda c: prune(c, sparsity="0.3", force=True),
         killed(2, "kill", {"sparsity": "0.3", "force": True}, done_before=True), rc=0, after=complete_run),
    Case("ctrlc-replace-3-force", lambda c: prune(c, sparsity="0.3", force=True),
         killed(3, "int", {"sparsity": "0.3", "force": True}, done_before=True), rc=0, after=complete_run),
    Case("json-killed-no-tmp-left", lambda c: evaluate(c, json=c.ws / "res2.json"), json_killed, rc=0, out=".",
         after=no_tmp_beside),   # the rerun writes a new name: the check of unchanged files then covers res.json
    # 2. outputs only to regular or new files
    Case("json-fifo", lambda c: evaluate(c, json=c.ws / "p"), fifo("p"), msg="--json", no_load=True),
    Case("json-chardev", lambda c: evaluate(c, json=c.ws / "null"), chardev("null"), msg="--json", no_load=True),
    Case("json-socket", lambda c: evaluate(c, json=c.ws / "s"), sock("s"), msg="--json", no_load=True),
    Case("json-link-outside", lambda c: evaluate(c, json=c.ws / "l.json"), link_out("l.json"), msg="--json",
         no_load=True),
    Case("report-fifo", lambda c: sweep(c, report=c.ws / "p"), fifo("p"), msg="--report", no_load=True),
    Case("report-chardev", lambda c: sweep(c, report=c.ws / "null"), chardev("null"), msg="--report", no_load=True),
    # 3. load only what is declared, checked before use
    Case("st-is-directory", lambda c: evaluate(c, model=c.ws / "m"), damage(st_dir), msg="model.safetensors",
         no_load=True),
    Case("st-trailing-bytes", lambda c: evaluate(c, model=c.ws / "m"), damage(trailing), msg="model.safetensors",
         no_load=True),
    Case("st-int32-weight", lambda c: evaluate(c, model=c.ws / "m"), st_edit(as_int32), msg="dtype|I32|int",
         no_load=True),
    Case("st-complex-weight", lambda c: evaluate(c, model=c.ws / "m"), st_edit(as_complex), msg="dtype|C64|complex",
         no_load=True),
    Case("st-second-file-overrides", lambda c: evaluate(c, model=c.ws / "m"), damage(second_file),
         msg="safetensors", no_load=True),
    Case("tok-ids-exceed-vocab", lambda c: evaluate(c, model=c.ws / "m"), damage(small_vocab), msg="vocab|token",
         no_load=True),
    Case("cfg-nan-eps", lambda c: evaluate(c, model=c.ws / "m"), damage(config(layer_norm_eps="__NaN__")),
         msg="config", no_load=True),
    Case("cfg-inf-init-range", lambda c: evaluate(c, model=c.ws / "m"),
         damage(config(initializer_range="__Inf__")), msg="config", no_load=True),
    Case("cfg-heads-zero", lambda c: evaluate(c, model=c.ws / "m"), damage(config(num_attention_heads=0)),
         msg="config|head", no_load=True),
    Case("cfg-hidden-negative", lambda c: evaluate(c, model=c.ws / "m"), damage(config(hidden_size=-32)),
         msg="config", no_load=True),
    Case("cfg-quantization", lambda c: evaluate(c, model=c.ws / "m"),
         damage(config(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})),
         msg="quantiz", no_load=True),
    Case("plain-int32-weight", lambda c: prune(c, model=c.ws / "m", method="magnitude"), plain_folder(as_int32),
         msg="dtype|I32|int", no_load=True),
    Case("plain-trailing-bytes", lambda c: prune(c, model=c.ws / "m"),
         with_(lambda c: plain_folder()(c), lambda c: trailing(c.ws / "m")), msg="model.safetensors", no_load=True),
    Case("plain-quantization", lambda c: prune(c, model=c.ws / "m"),
         plain_folder(cfg={"quantization_config": {"quant_method": "gptq", "bits": 4}}), msg="quantiz", no_load=True),
    Case("plain-unknown-architecture", lambda c: prune(c, model=c.ws / "m"),
         plain_folder(cfg={"model_type": "bart"}), msg="not supported|bart", no_load=True),
    Case("plain-index-outside", lambda c: prune(c, model=c.ws / "m"),
         with_(lambda c: plain_folder()(c), lambda c: index_outside(c.ws / "m")), msg="index|safetensors",
         no_load=True),
    Case("plain-nan-config", lambda c: prune(c, model=c.ws / "m"),
         plain_folder(cfg={"hidden_dropout_prob": "__NaN__"}), msg="config", no_load=True),
    # 4. devices resolved up front
    Case("device-map-cuda0", lambda c: prune(c, model="tiny-gpt2", device_map="cuda:0"), user_files, msg="device",
         no_load=True),
    Case("device-map-meta", lambda c: prune(c, model="tiny-gpt2", device_map="meta"), user_files, msg="device",
         no_load=True),
    Case("device-map-unknown", lambda c: prune(c, model="tiny-gpt2", device_map="toaster"), user_files,
         msg="device", no_load=True),
    Case("max-memory-absent-gpu", lambda c: prune(c, model="tiny-gpt2", device_map="auto",
                                                  max_memory="3:1GiB,cpu:1GiB"), user_files, msg="max-memory|GPU",
         no_load=True),
    Case("device-meta", lambda c: evaluate(c, device="meta"), user_files, msg="device", no_load=True),
    # 5. numbers (shard sizes here; the request objects' bounds are the structure issue's)
    Case("shard-half-byte", lambda c: prune(c, max_shard_size="0.5"), user_files, msg="shard", no_load=True),
    Case("shard-huge", lambda c: prune(c, max_shard_size="1e400"), user_files, msg="shard", no_load=True),
    Case("seed-2-64", lambda c: ["finetune", "--model", "tiny-bert", "--data", str(c.assets.csv), "--seed",
                                 str(2 ** 64), "--out", str(c.out)], user_files, msg="seed", no_load=True),
    # 6. paths and names
    Case("out-newline-under-file", lambda c: prune(c, out=str(c.ws / "keep.txt" / "a\nb")), user_files,
         msg="not a folder", no_load=True),
    Case("model-300-chars", lambda c: evaluate(c, model=str(c.ws / LONG)), user_files, msg="long|model",
         no_load=True),
    Case("out-300-chars", lambda c: prune(c, out=str(c.ws / LONG)), user_files, msg="long|--out", no_load=True),
    Case("data-symlink-loop", lambda c: evaluate(c, data=str(c.ws / "loop" / "d.csv")), loop, msg="link|loop",
         no_load=True),
    Case("out-symlink-loop", lambda c: prune(c, out=str(c.ws / "loop" / "o")), loop, msg="link|loop",
         no_load=True),
    Case("json-newline-missing-folder", lambda c: evaluate(c, json=str(c.ws / "no\nne" / "x.json")), user_files,
         msg="--json", no_load=True),
    # 7. data
    Case("jsonl-text-object", lambda c: evaluate(c, data=c.ws / "d.jsonl"),
         with_(lambda c: c.write("d.jsonl", '{"text": {"a": 1}, "label": 1}\n{"text": "ok", "label": 0}\n')),
         msg="text", no_load=True),
    Case("jsonl-text-null", lambda c: evaluate(c, data=c.ws / "d.jsonl"),
         with_(lambda c: c.write("d.jsonl", '{"text": null, "label": 1}\n')), msg="text", no_load=True),
    Case("jsonl-deep-nesting", lambda c: evaluate(c, data=c.ws / "d.jsonl"),
         with_(lambda c: c.write("d.jsonl", '{"text": ' + "[" * 100000 + "]" * 100000 + ', "label": 1}\n')),
         msg="d.jsonl", no_load=True),
    Case("csv-line-too-long", lambda c: evaluate(c, data=c.ws / "d.csv"),
         with_(lambda c: c.write("d.csv", "text,label\n" + "word " * 2_000_000 + ",1\nok,0\n")), msg="long|cap",
         no_load=True),
    Case("text-line-too-long", lambda c: prune(c, method="activation", calib_data=c.ws / "t.txt"),
         with_(lambda c: c.write("t.txt", "word " * 2_000_000 + "\nshort\n")), msg="long|cap"),  # read after the load
    Case("csv-bom-accepted", lambda c: evaluate(c, data=c.ws / "bom.csv"), bom_csv, rc=0),
    Case("figures-run-with-space", lambda c: figures(c, c.ws / "my run"), spaced_run, rc=0),
    # 8. warnings stay off stderr
    Case("meta-zero-width-layer", lambda c: evaluate(c, model=c.ws / "m"),
         damage(meta(ffn_widths=[0, 37, 37])), msg="anatomy-prune"),
]


def verdict_row(case: Case, base: Path, assets) -> tuple:
    try:
        verdict, res = th.run_case(case, assets, base, capsys=None, src=SRC[0])
    except Exception as exc:  # noqa: BLE001 - a setup that does not fit the tree
        return case.id, None, 0, False, "?", "?", f"harness: {type(exc).__name__}: {exc}"[:120]
    lines = len(th.error_lines(res.err))
    bad = {k: v for k, v in verdict.items() if v is not True and k != "message"}
    touched = verdict.get("unchanged") is not True
    lost = touched and "removed" in str(verdict.get("unchanged")) or verdict.get("after", True) is not True
    return case.id, res.rc, lines, res.traceback, touched, lost, "; ".join(f"{k}: {str(v)[:80]}" for k, v in bad.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(HERE.parent / "src"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated case ids (or prefixes)")
    args = ap.parse_args()
    SRC[0] = Path(args.src).resolve()
    cases = CASES
    if args.only:
        cases = [c for c in CASES if any(c.id.startswith(o) for o in args.only.split(","))]
    base = Path(tempfile.mkdtemp(prefix="hostile-battery-"))
    t0 = time.perf_counter()
    assets = th.build_assets(base / "assets")
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: verdict_row(c, base, assets), cases))
    w = max(len(c.id) for c in cases)
    print(f"{'case':<{w}}  exit  lines  traceback  outside-touched  lost  clean  what failed")
    clean = 0
    for cid, rc, lines, tb, touched, lost, why in rows:
        ok = not why
        clean += ok
        print(f"{cid:<{w}}  {str(rc):>4}  {lines:>5}  {str(tb):<9}  {str(touched):<15}  {str(lost):<4}  "
              f"{'yes' if ok else 'NO':<5}  {why}")
    print(f"\n{clean}/{len(cases)} clean ({args.src}; {time.perf_counter() - t0:.0f} s)")
    import shutil
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
