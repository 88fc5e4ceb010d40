"""Run folders: every job writes its outputs through `RunFolder`, so nothing is lost, nothing is
half-written and nothing outside --out is touched (staging, a lock, a journaled commit, and never moving
what this run did not create; the full contract is docs/runfolder.md). A leaf module: the standard
library and `errors` only.
"""
from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .safefiles import (_finite, _json_default, check_output_file, dumps, read_json, refuse_special,  # noqa: F401
                        usable_path, write_json, write_text)

MARKER = ".anatomy-prune.json"
LOCK = ".anatomy-prune.lock"
STAGING = ".anatomy-prune-staging"
STAGING_MARK = ".staging-of-anatomy-prune"
JOURNAL = ".commit.json"   # inside the staging folder: the moves of a decided commit
RESUME = ".anatomy-prune-resume.json"
OWN = {MARKER, LOCK, STAGING, RESUME}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+= -]{0,126}[A-Za-z0-9._+=-]$|^[A-Za-z0-9]$")  # an entry's name:
# no separators, no .., spaces inside only
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("anatomy_prune_run", default=None)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def check_out_path(out: str | Path, what: str = "--out") -> Path:
    """Refuse an output path that is no place for a run folder; returns it unresolved."""
    text = str(out)
    if not text.strip():
        raise UserError(f"{what} is empty; give a new folder, e.g. runs/my-run")
    p = usable_path(text, what)
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
    missing_parts(p, what)
    return p


def missing_parts(p: Path, what: str = "--out") -> list[Path]:
    """The parts of `p` that do not exist yet (deepest first), below its nearest existing part, which must be a
    folder: a UserError when it is a file or a broken symbolic link. Checked before a job loads or builds
    anything, and again when the run folder is made."""
    missing, q = [], p
    while not q.exists() and not q.is_symlink():
        missing.append(q)
        q = q.parent
    if q.is_symlink() and not q.exists():
        raise UserError(f"{what} '{p}' goes through a broken symbolic link ({q}); choose another path")
    if not q.is_dir():
        raise UserError(f"{what} '{p}': '{q}' is not a folder; choose another path")
    return missing


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
        self._decided = False        # a commit whose journal is written and whose moves are not all made

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
        self._token = _ACTIVE.set(self)
        return self

    def _open(self) -> None:
        p = self.path
        missing = missing_parts(p, self.what)     # again: the folder may have changed since __init__
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise UserError(f"cannot create {self.what} '{p}' ({exc.strerror or exc}); choose a folder "
                                "you can write to") from None
            self._created.append(d)
        fresh = bool(missing)
        if not missing:
            if (self.staging / JOURNAL).is_file() and not self.staging.is_symlink():
                self._lock()
                self._recover()  # a commit a killed run decided: complete it before looking at the folder
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
        if self._lock_fd is None:
            self._lock()
        st = self.staging
        if st.is_symlink() or (st.exists() and not st.is_dir()):
            raise UserError(f"'{st}' is not a staging folder anatomy-prune made; choose another {self.what}")
        if st.is_dir():
            if not (st / STAGING_MARK).is_file():
                raise UserError(f"'{st}' was not made by anatomy-prune; choose another {self.what}")
            shutil.rmtree(st)  # stale: left by a run killed before its commit (we hold the lock)
        try:
            st.mkdir()
            self._staging_made = True
            (st / STAGING_MARK).write_text(f"{os.getpid()} {now_iso()}\n")
            if fresh:  # a folder this run made is marked at once, so a rerun after a kill recognises it
                self._write_marker("incomplete", [])
        except OSError as exc:
            raise UserError(f"cannot write to {self.what} '{p}' ({exc.strerror}); choose a folder you can "
                            "write to") from None

    def _lock(self) -> None:
        """Take the folder's lock (flock on .anatomy-prune.lock); another writer holding it is a UserError."""
        p = self.path
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

    def _recover(self) -> None:
        """Complete the commit a killed run decided (its journal is in the staging folder): the moves not yet
        made, then the marker; then the staging folder goes. Needs the lock."""
        st = self.staging
        if not (st / STAGING_MARK).is_file():
            raise UserError(f"'{st}' was not made by anatomy-prune; choose another {self.what}")
        try:
            journal = json.loads((st / JOURNAL).read_text(encoding="utf-8"))
            moves = [check_entry_name(n) for n in journal["moves"]]
            outputs = [check_entry_name(n) for n in journal["outputs"]]
            marker = {k: journal[k] for k in ("kind", "digest", "settings")}
        except (OSError, ValueError, KeyError, TypeError, UserError):
            shutil.rmtree(st)  # a journal that is not complete was never decided: the commit did not happen
            return
        try:
            mine = set((self._read_marker() or {}).get("outputs", []))
        except UserError:
            mine = set()
        self._apply(moves, mine)
        write_json(self.path / MARKER, {**marker, "status": "complete", "outputs": outputs, "written": now_iso(),
                                        "tool": "anatomy-prune"}, tmp_dir=st)
        (self.path / RESUME).unlink(missing_ok=True)
        shutil.rmtree(st)

    def _apply(self, moves: list[str], replaceable: set[str]) -> None:
        """Move each staged entry into place; an entry it replaces goes into the staging folder's trash.
        Repeatable: a move already made is skipped, so a rerun after a kill completes the rest."""
        trash = self.staging / ".replaced"
        left = [n for n in moves if (self.staging / n).exists() or (self.staging / n).is_symlink()]  # not moved yet
        for name in left:  # every clash first: a refused commit moves nothing
            dst = self.path / name
            if (dst.exists() or dst.is_symlink()) and name not in replaceable:
                raise UserError(f"'{dst}' exists and was not written by anatomy-prune; move it away or "
                                f"choose another {self.what}")
        for name in left:
            src, dst = self.staging / name, self.path / name
            if dst.exists() or dst.is_symlink():
                trash.mkdir(exist_ok=True)
                old = trash / name
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                os.rename(dst, old)  # the entry itself (a link is moved, never followed)
            os.rename(src, dst)

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
        write_json(self.path / RESUME, {"kind": self.kind, "digest": self.digest, "data": dict(data)},
                   tmp_dir=self.staging)
        self._write_marker("incomplete", self._outputs_now())

    # --- exit: commit or clean up ---------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc_type is not None
        _ACTIVE.reset(self._token)
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
        moves = [n for n in self._staged if (self.staging / n).exists() or (self.staging / n).is_symlink()]
        journal = {"kind": self.kind, "digest": self.digest, "settings": self.settings, "moves": moves,
                   "outputs": sorted(outs | set(moves))}
        write_json(self.staging / JOURNAL, journal, tmp_dir=self.staging)  # the commit is decided here
        self._decided = True   # from here a failure keeps the staging folder: the next run completes it
        self._apply(moves, outs)
        self._write_marker("complete", journal["outputs"])
        (self.path / RESUME).unlink(missing_ok=True)
        self._decided = False

    def _write_marker(self, status: str, outputs: list[str]) -> None:
        write_json(self.path / MARKER, {"kind": self.kind, "digest": self.digest, "status": status,
                                        "outputs": outputs, "settings": self.settings, "written": now_iso(),
                                        "tool": "anatomy-prune"}, tmp_dir=self.staging)

    def _cleanup(self, failed: bool = True) -> None:
        st = self.staging
        ours = self._staging_made and not self._decided
        if ours and st.is_dir() and not st.is_symlink() and (st / STAGING_MARK).is_file():
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


def active_scratch(name: str) -> Path | None:
    """A scratch folder inside the staging folder of the run now being written (see RunFolder.scratch), or
    None outside a run: temporary work (e.g. weights offloaded to disk) goes and is removed with the run."""
    rf = _ACTIVE.get()
    return rf.scratch(name) if rf is not None else None
