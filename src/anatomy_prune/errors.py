"""The one exception type a user sees as a one-line message, the one helper that keeps any text on one line
(paths may hold newlines and other control characters), and the one place such an error becomes that line and
exit status 2 (exit_status: the CLI and every benchmark script run their body through it)."""
import sys
import unicodedata
from typing import Callable

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def printable(text: object) -> str:
    """`text` with control, separator-line and format characters escaped (\\n, \\x07, \\u2028): one line."""
    out = []
    for ch in str(text):
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or ch in "\u202e\u202d\u2066\u2067\u2068":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


class UserError(Exception):
    """Bad input: unknown model, wrong file, out-of-range number, a plan that does not fit the model.
    Its text is always one line: control characters in the message (from a path, a name) are escaped."""

    def __str__(self) -> str:
        return printable(super().__str__())


def as_user_error(exc: BaseException) -> UserError | None:
    """The CLI's last line of defence: an error that can only come from what the user named (an OSError on a
    path, e.g. a name too long or a link loop; input nested too deeply) as a one-line UserError, else None
    (a bug, which keeps its traceback)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return UserError(f"cannot use '{exc.filename}' ({exc.strerror or type(exc).__name__}); check the path")
    if isinstance(exc, RecursionError):
        return UserError("an input is nested too deeply to read; give a flatter file")
    if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop"):
        return UserError(f"a path goes through a symbolic link loop ({exc}); choose another path")
    return None


def exit_status(job: Callable[[], int | None], prefix: str = "") -> int:
    """Runs `job` (a command's or a benchmark script's body) and gives its exit status: its own (None is 0), or 2
    for bad input, printed as one line on stderr ("<prefix>: error: ..."): a UserError, or an error that can only
    come from what the user named (as_user_error). Anything else is a bug and keeps its traceback."""
    lead = f"{prefix}: error" if prefix else "error"
    try:
        return job() or 0
    except UserError as exc:
        print(f"{lead}: {exc}", file=sys.stderr)
        return 2
    except (OSError, RecursionError, RuntimeError) as exc:
        err = as_user_error(exc)
        if err is None:
            raise
        print(f"{lead}: {err}", file=sys.stderr)
        return 2
