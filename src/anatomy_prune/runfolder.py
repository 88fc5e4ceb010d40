"""Run folders: every job writes its outputs through `RunFolder`, so nothing is lost, nothing is
half-written and nothing outside --out is touched. A leaf module: the standard library and `errors` only.

A run folder belongs to one job. Its marker `.anatomy-prune.json` records the job's kind, a digest of the
settings that decide its outputs, the entries the job wrote, and whether it finished. The writer

- refuses a path that is no place for a run: `.`, `..`, the current folder or a folder above it, the
  filesystem root, the home folder, a symbolic link, a file, a folder of another run (unless `force`),
  and a non-empty folder that anatomy-prune did not write (unless `force`, and even then it only adds);
- makes the folder and checks that it can write there *before* any compute starts (`__enter__`);
- holds a lock (`.anatomy-prune.lock`, flock) while it works: a second writer fails at once, one line;
- stages every output in `.anatomy-prune-staging/` (marked, so a rerun recognises a stale one left by a
  killed run and removes it) and moves it into place only when the job succeeds;
- on failure removes what this run created: the staging folder, the lock file, and the run folder (and
  parents) if this run made them and nothing worth keeping (a resume file) is inside;
- never moves, renames or deletes anything it did not create: an output replaces an entry of the same
  name only when the marker says an anatomy-prune run wrote it; any other clash is an error.

Resume files (a long sweep's finished points) live inside the run folder (`.anatomy-prune-resume.json`),
keyed by the settings digest; their contents are data, never used as paths.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError

MARKER = ".anatomy-prune.json"
LOCK = ".anatomy-prune.lock"
STAGING = ".anatomy-prune-staging"
STAGING_MARK = ".staging-of-anatomy-prune"
RESUME = ".anatomy-prune-resume.json"
OWN = {MARKER, LOCK, STAGING, RESUME}
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files get the permissions an ordinary file would have
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")  # an output entry's name: no separators, no ..


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- JSON ---------------------------------------------------------------------------------------

def _json_default(o: Any):
    if hasattr(o, "tolist"):  # tensors and numpy arrays, without importing either here
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o: Any):
    """NaN and infinities become None: JSON has no such numbers (strict readers reject them)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def dumps(obj: Any) -> str:
    return json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=1)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (see write_text)."""
    if Path(path).is_dir():
        raise UserError(f"'{path}' is a folder; give a file name for the JSON output")
    return write_text(path, dumps(obj))


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically: a uniquely named temporary file beside `path`, then a rename."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"cannot write '{path}': its folder does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write '{path}' ({exc.strerror}); choose another path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; an output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable, non-UTF-8 or malformed file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not UTF-8 text; give the JSON file anatomy-prune wrote") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{what} '{path}' is nested too deeply; give the JSON file anatomy-prune wrote") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}' ({exc.strerror})") from None


def settings_digest(settings: Mapping | None) -> str:
    """A short digest of the settings that decide a run's outputs (key order does not matter)."""
    text = json.dumps(_finite(json.loads(json.dumps(settings or {}, default=_json_default))), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- paths ---------------------------------------------------------------------------------------

def check_entry_name(name: str) -> str:
    """An output entry's name inside a run folder: one plain path component (no '/', no '..')."""
    if not isinstance(name, str) or not _NAME.match(name) or name in OWN:
        raise UserError(f"'{name}' is not a valid output name inside a run folder")
    return name


def safe_child(folder: Path, relative: str) -> Path:
    """folder / relative, where every component is a plain name: nothing can point outside `folder`."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute():
        raise UserError(f"'{relative}' is not a relative path inside the run folder")
    for p in parts:
        if p in (".", "..") or "/" in p or "\\" in p or p.startswith(".anatomy-prune"):
            raise UserError(f"'{relative}' would leave the run folder; use plain names")
    return folder.joinpath(*parts)


def check_out_path(out: str | Path, what: str = "--out") -> Path:
    """Refuse an output path that is no place for a run folder; returns it unresolved."""
    text = str(out)
    if not text.strip():
        raise UserError(f"{what} is empty; give a new folder, e.g. runs/my-run")
    p = Path(text).expanduser()
    if p.resolve() == Path(p.resolve().anchor):  # before the name check: '/' has no name either
        raise UserError(f"{what} '{text}' is the filesystem root; give a new folder, e.g. runs/my-run")
    if p.name in ("", ".", "..") or text.rstrip("/").endswith(("/.", "/..")) or text.strip() in (".", ".."):
        raise UserError(f"{what} '{text}' names the current or a parent folder; give a new folder, e.g. runs/my-run")
    if p.is_symlink():
        raise UserError(f"{what} '{text}' is a symbolic link; give a real folder path")
    resolved = p.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        raise UserError(f"{what} '{text}' is the filesystem root; give a new folder, e.g. runs/my-run")
    if resolved == Path.home().resolve():
        raise UserError(f"{what} '{text}' is your home folder; give a new folder, e.g. runs/my-run")
    if cwd == resolved or resolved in cwd.parents:
        raise UserError(f"{what} '{text}' contains the current folder; give a new folder, e.g. runs/my-run")
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} '{text}' exists and is not a folder; choose another path")
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """A single output file a command will write (e.g. --json, --report): refused before any compute when
    it is a folder, a symbolic link, or in a folder that does not exist or cannot be written."""
    p = Path(path).expanduser()
    if not str(path).strip() or p.name in ("", ".", ".."):
        raise UserError(f"{what} '{path}' is not a file name; give e.g. results.json")
    if p.is_symlink():
        raise UserError(f"{what} '{path}' is a symbolic link; give a plain file path")
    if p.is_dir():
        raise UserError(f"{what} '{path}' is a folder; give a file name inside it, e.g. {p / 'results.json'}")
    if not p.parent.is_dir():
        raise UserError(f"{what} '{path}': folder '{p.parent}' does not exist; create it first")
    if not os.access(p.parent, os.W_OK):
        raise UserError(f"{what} '{path}': folder '{p.parent}' is not writable; choose another path")
    return p


# --- the writer ----------------------------------------------------------------------------------

class RunFolder:
    """One job's output folder. Use as a context manager around the whole job:

        with RunFolder(out, "prune", settings) as rf:
            ...compute...
            rf.write_json("metrics.json", metrics)      # staged
            save_model(..., rf.stage("model"))           # a staged folder
        # on success everything is moved into `out`; on an exception nothing is

    `previous` is the marker of an earlier run in the same folder (or None); `same_as_before` tells
    whether it was this kind of job with the same settings and finished (a caller may then reuse it).
    """

    def __init__(self, out: str | Path, kind: str, settings: Mapping | None = None, *, force: bool = False,
                 what: str = "--out"):
        self.path = check_out_path(out, what)
        self.kind = kind
        self.settings = dict(settings or {})
        self.digest = settings_digest(self.settings)
        self.force = force
        self.what = what
        self.previous: dict | None = None
        self._created: list[Path] = []     # folders this run made (deepest last)
        self._lock_fd: int | None = None
        self._lock_created = False
        self._staged: list[str] = []
        self._entered = False
        self._staging_made = False   # only a writer that holds the lock made (and may remove) the staging

    # --- state of the folder before this run --------------------------------------------------
    @property
    def staging(self) -> Path:
        return self.path / STAGING

    @property
    def same_as_before(self) -> bool:
        p = self.previous or {}
        return p.get("kind") == self.kind and p.get("digest") == self.digest and p.get("status") == "complete"

    def _read_marker(self) -> dict | None:
        m = self.path / MARKER
        if m.is_symlink() or (m.exists() and not m.is_file()):
            raise UserError(f"'{self.path}' has a damaged run marker ({MARKER}); choose another {self.what}")
        if not m.is_file():
            return None
        try:
            data = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UserError(f"'{m}' is damaged; choose another {self.what} (or remove that folder yourself)") from None
        if not isinstance(data, dict) or not isinstance(data.get("outputs", []), list):
            raise UserError(f"'{m}' is damaged; choose another {self.what} (or remove that folder yourself)")
        return data

    def _user_entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name not in OWN)

    # --- enter: checks, folder, lock, stale staging -------------------------------------------
    def __enter__(self) -> "RunFolder":
        try:
            self._open()
        except BaseException:
            self._cleanup()
            raise
        self._entered = True
        return self

    def _open(self) -> None:
        p = self.path
        missing = []
        q = p
        while not q.exists() and not q.is_symlink():
            missing.append(q)
            q = q.parent
        if q.is_symlink() and not q.exists():
            raise UserError(f"{self.what} '{p}' goes through a broken symbolic link ({q}); choose another path")
        if not q.is_dir():
            raise UserError(f"{self.what} '{p}': '{q}' is not a folder; choose another path")
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise UserError(f"cannot create {self.what} '{p}' ({exc.strerror or exc}); choose a folder "
                                "you can write to") from None
            self._created.append(d)
        fresh = bool(missing)
        if not missing:
            self.previous = self._read_marker()
            if self.previous is None:
                others = self._user_entries()
                if others and not self.force:
                    raise UserError(f"{self.what} '{p}' is not empty and was not written by anatomy-prune; "
                                    "choose a new folder (or --force to add outputs beside its files)")
            elif not (self.previous.get("kind") == self.kind and self.previous.get("digest") == self.digest) \
                    and not self.force:
                raise UserError(f"{self.what} '{p}' holds a {self.previous.get('kind', 'different')} run with other "
                                "settings; choose another folder or use --force to replace its outputs")
        lock = p / LOCK
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise UserError(f"'{lock}' is not a lock file anatomy-prune made; choose another {self.what}")
        try:
            self._lock_created = not lock.exists()
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            self._lock_created = False
            raise UserError(f"cannot write to {self.what} '{p}' ({exc.strerror}); choose a folder you can "
                            "write to") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            self._lock_created = False  # the other writer's file
            raise UserError(f"another anatomy-prune run is writing '{p}' right now; wait for it or choose "
                            f"another {self.what}") from None
        st = self.staging
        if st.is_symlink() or (st.exists() and not st.is_dir()):
            raise UserError(f"'{st}' is not a staging folder anatomy-prune made; choose another {self.what}")
        if st.is_dir():
            if not (st / STAGING_MARK).is_file():
                raise UserError(f"'{st}' was not made by anatomy-prune; choose another {self.what}")
            shutil.rmtree(st)  # stale: left by a run that was killed (we hold the lock, so none is running)
        try:
            st.mkdir()
            self._staging_made = True
            (st / STAGING_MARK).write_text(f"{os.getpid()} {now_iso()}\n")
            if fresh:  # a folder this run made is marked at once, so a rerun after a kill recognises it
                self._write_marker("incomplete", [])
        except OSError as exc:
            raise UserError(f"cannot write to {self.what} '{p}' ({exc.strerror}); choose a folder you can "
                            "write to") from None

    # --- staging --------------------------------------------------------------------------------
    def stage(self, name: str) -> Path:
        """The staged path of output entry `name` (a file or a folder the caller creates)."""
        if not self._entered:
            raise RuntimeError("RunFolder.stage outside its with-block")
        check_entry_name(name)
        if name not in self._staged:
            self._staged.append(name)
        return self.staging / name

    def scratch(self, name: str) -> Path:
        """A folder for temporary work inside the staging folder; it is not an output and goes with it."""
        d = self.staging / ".scratch" / check_entry_name(name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_dir(self, name: str) -> Path:
        d = self.stage(name)
        d.mkdir(exist_ok=True)
        return d

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.stage(name), obj)

    def write_text(self, name: str, text: str) -> Path:
        return write_text(self.stage(name), text)

    def existing(self, name: str) -> Path | None:
        """An entry that an earlier anatomy-prune run wrote into this folder (for reuse), or None."""
        check_entry_name(name)
        q = self.path / name
        outs = (self.previous or {}).get("outputs", [])
        return q if name in outs and (q.exists() and not q.is_symlink()) else None

    # --- resume ---------------------------------------------------------------------------------
    def read_resume(self) -> dict | None:
        """The resume data of an earlier, stopped run with the same kind and settings, else None."""
        f = self.path / RESUME
        if not f.is_file() or f.is_symlink():
            return None
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(data, dict) or data.get("kind") != self.kind or data.get("digest") != self.digest:
            return None
        body = data.get("data")
        return body if isinstance(body, dict) else None

    def write_resume(self, data: Mapping) -> None:
        """Save progress inside the folder (atomically); the marker says the run is incomplete."""
        write_json(self.path / RESUME, {"kind": self.kind, "digest": self.digest, "data": dict(data)})
        self._write_marker("incomplete", self._outputs_now())

    # --- exit: commit or clean up ---------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc_type is not None
        try:
            if not failed:
                self._commit()
        except BaseException:
            failed = True  # a refused commit is a failed run: clean up as for any other failure
            raise
        finally:
            self._cleanup(failed=failed)
        return False

    def _outputs_now(self) -> list[str]:
        prev = [n for n in (self.previous or {}).get("outputs", []) if isinstance(n, str)]
        return sorted({n for n in prev if (self.path / n).exists() or (self.path / n).is_symlink()})

    def _commit(self) -> None:
        if not self._staged and self.same_as_before:
            return  # nothing new (a reused run): leave the folder exactly as it was
        outs = set(self._outputs_now())
        for name in self._staged:  # every clash first: a refused commit moves nothing
            dst = self.path / name
            if (dst.exists() or dst.is_symlink()) and name not in outs:
                raise UserError(f"'{dst}' exists and was not written by anatomy-prune; move it away or "
                                f"choose another {self.what}")
        trash = self.staging / ".replaced"
        for name in self._staged:
            src = self.staging / name
            if not src.exists() and not src.is_symlink():
                continue
            dst = self.path / name
            if dst.exists() or dst.is_symlink():
                if name not in outs:
                    raise UserError(f"'{dst}' exists and was not written by anatomy-prune; move it away or "
                                    f"choose another {self.what}")
                trash.mkdir(exist_ok=True)
                os.rename(dst, trash / name)  # the entry itself (a link is moved, never followed)
            os.rename(src, dst)
            outs.add(name)
        self._write_marker("complete", sorted(outs))
        (self.path / RESUME).unlink(missing_ok=True)

    def _write_marker(self, status: str, outputs: list[str]) -> None:
        write_json(self.path / MARKER, {"kind": self.kind, "digest": self.digest, "status": status,
                                        "outputs": outputs, "settings": self.settings, "written": now_iso(),
                                        "tool": "anatomy-prune"})

    def _cleanup(self, failed: bool = True) -> None:
        st = self.staging
        if self._staging_made and st.is_dir() and not st.is_symlink() and (st / STAGING_MARK).is_file():
            shutil.rmtree(st, ignore_errors=True)
        if self._lock_fd is not None:
            if self._lock_created and failed:
                (self.path / LOCK).unlink(missing_ok=True)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if failed:
            for d in reversed(self._created):  # deepest first; only folders this run made, only if empty
                try:
                    if d == self.path and {e.name for e in d.iterdir()} <= {MARKER, LOCK}:
                        (d / MARKER).unlink(missing_ok=True)
                        (d / LOCK).unlink(missing_ok=True)
                    d.rmdir()
                except OSError:
                    break  # not empty (a resume file or a child's output): keep it
