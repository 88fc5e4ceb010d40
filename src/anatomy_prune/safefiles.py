"""Files a user names and files a run writes, handled so that nothing but a regular file (or a new name) is
ever replaced and nothing is left half-written: atomic JSON and text writers, a strict JSON reader, and the
checks of a path before anything runs (over-long names, link loops, devices, FIFOs, sockets). A leaf module:
the standard library and `errors` only (runfolder builds on it)."""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files get the permissions an ordinary file would have


def _ROOT_FD() -> int:
    """A descriptor of '/', so os.link takes the linkat path that follows /proc/self/fd links (opened once)."""
    global _root_fd
    if _root_fd is None:
        _root_fd = os.open("/", os.O_RDONLY)
    return _root_fd


_root_fd: int | None = None


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


def write_json(path: str | Path, obj: Any, *, tmp_dir: str | Path | None = None) -> Path:
    """Write JSON atomically (see write_text)."""
    if Path(path).is_dir():
        raise UserError(f"'{path}' is a folder; give a file name for the JSON output")
    return write_text(path, dumps(obj), tmp_dir=tmp_dir)


def refuse_special(path: Path, what: str = "output") -> None:
    """Only a regular file (or nothing) may be replaced: a device, a FIFO, a socket or a symbolic link is a
    one-line UserError (as root, `--json /dev/null` must not replace /dev/null)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{what} '{path}' cannot be used ({exc.strerror}); choose another path") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{what} '{path}' is a symbolic link; give a plain file path")
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} '{path}' is a folder; give a file name")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "special")
        raise UserError(f"{what} '{path}' is {kind}, not a regular file; give a new or a regular file's path")


def write_text(path: str | Path, text: str, *, tmp_dir: str | Path | None = None) -> Path:
    """Write a text file atomically. Inside a run folder (`tmp_dir`: its staging folder) the temporary file
    is made there and renamed into place; elsewhere it is an unnamed file (O_TMPFILE) in the target's folder
    that is linked in when complete, so a killed write leaves nothing beside the user's files. Only a new
    path or a regular file is written (refuse_special)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"cannot write '{path}': its folder does not exist")
    refuse_special(path)
    data = text.encode("utf-8")
    if tmp_dir is None and hasattr(os, "O_TMPFILE"):
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666 & ~_UMASK)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise UserError(f"cannot write '{path}' ({exc.strerror}); choose another path") from None
        else:
            return _link_unnamed(fd, path, data)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=tmp_dir or path.parent)
    except OSError as exc:
        raise UserError(f"cannot write '{path}' ({exc.strerror}); choose another path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; an output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link_unnamed(fd: int, path: Path, data: bytes) -> Path:
    """Fill an O_TMPFILE file and give it `path`'s name: a new name directly (linkat), an existing regular
    file through a link beside it renamed over it (the only moment a name beside it exists)."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        proc = f"/proc/self/fd/{f.fileno()}"
        try:
            os.link(proc, path, src_dir_fd=_ROOT_FD(), follow_symlinks=True)  # linkat, AT_SYMLINK_FOLLOW
            return path
        except FileExistsError:
            pass
        refuse_special(path)
        tmp = path.parent / f".{path.name[:64]}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        os.link(proc, tmp, src_dir_fd=_ROOT_FD(), follow_symlinks=True)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def read_document(path: Path, parse: Callable[[str], Any], what: str, fmt: str, hint: str = "",
                  detail: Callable[[ValueError], str] = str) -> Any:
    """Parse a UTF-8 text file with `parse` (json.loads, tomllib.loads); an unreadable, non-UTF-8, malformed or
    too deeply nested file is a one-line UserError. `hint` ends the lines about content the user should replace."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not UTF-8 text{hint}") from None
    except RecursionError:
        raise UserError(f"{what} '{path}' is nested too deeply{hint}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}' ({exc.strerror})") from None
    except ValueError as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise UserError(f"{what} '{path}' is not valid {fmt} ({detail(exc)})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable, non-UTF-8 or malformed file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    return read_document(path, json.loads, what, "JSON", "; give the JSON file anatomy-prune wrote",
                         lambda exc: f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(exc))


NAME_MAX = 255   # bytes in one path component (Linux and macOS)


def usable_path(text: str | Path, what: str) -> Path:
    """`text` as a path (~ expanded) that can be looked at: an over-long component or a symbolic link loop
    is a one-line UserError here, not an OSError deep inside a later call."""
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # ~user of an unknown user
        raise UserError(f"{what} '{text}' names an unknown home folder; give a plain path") from None
    for part in p.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{what} '{text}' has a name of {len(os.fsencode(part))} bytes (at most {NAME_MAX}); "
                            "use a shorter name")
    try:
        p.resolve()
        os.lstat(p)
    except FileNotFoundError:
        pass
    except RuntimeError:  # Python < 3.13: a symbolic link loop in resolve()
        raise UserError(f"{what} '{text}' goes through a symbolic link loop; choose another path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{what} '{text}' goes through a symbolic link loop; choose another path") from None
        if exc.errno not in (errno.ENOTDIR,):
            raise UserError(f"{what} '{text}' cannot be used ({exc.strerror}); choose another path") from None
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """A single output file a command will write (e.g. --json, --report): refused before any compute when
    it is a folder, a symbolic link, a device, FIFO or socket, or in a folder that does not exist or cannot be
    written."""
    p = usable_path(path, what)
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
    refuse_special(p, what)
    return p
