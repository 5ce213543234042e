"""Writing a report file: a regular file is either the old one or the complete new one.

* A regular file (or a new name) is written atomically: a temp file in the same
  directory, fsync, os.replace, fsync of the directory. The new file gets the old
  file's permission bits, or 0o666 minus the user's umask (mkstemp alone would
  leave 0600). The temp file is removed on any failure, Ctrl-C included.
* A symlink to a regular file: the link's target is replaced atomically, the
  link kept.
* A character device or a FIFO (/dev/null, a named pipe, /dev/stdout on a
  terminal or a pipe): written through, never renamed over or truncated.
* /dev/stdout, /dev/stderr, /dev/fd/1|2, /proc/self/fd/1|2 are the process's own
  streams, whatever they point at: written to the stream (so `-o /dev/stdout >> log`
  appends as the shell asked).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from ..errors import OutputError

_STREAM_PATHS = {
    "/dev/stdout": 1, "/dev/fd/1": 1, "/proc/self/fd/1": 1,
    "/dev/stderr": 2, "/dev/fd/2": 2, "/proc/self/fd/2": 2,
}


def stream_of(path: str | os.PathLike[str]) -> int | None:
    """1 or 2 when `path` names the process's own stdout or stderr, else None."""
    return _STREAM_PATHS.get(os.path.abspath(os.fspath(path)))


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else
    by setting and restoring it at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fail(target: str, exc: OSError | str) -> OutputError:
    why = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    return OutputError(f"{target}: cannot write the report: {why}")


def _write_stream(fd: int, text: str) -> None:
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.write(text)
    stream.flush()


def _write_through(target: str, text: str) -> None:
    """A device or FIFO: open for writing (no create, no truncate) and write."""
    fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _write_replacing(target: Path, text: str, mode: int) -> None:
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # durability of the rename; not every filesystem allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` as described in the module docstring; OutputError (exit 5) on failure."""
    shown = os.fspath(path)
    fd = stream_of(path)
    try:
        if fd is not None:
            _write_stream(fd, text)
            return
        try:
            st = os.stat(shown)  # follows symlinks
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            _write_through(shown, text)
            return
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _fail(shown, "exists and is not a regular file, a character device or a FIFO")
        target = Path(os.path.realpath(shown))  # a symlink's target; the link itself stays
        if not target.parent.is_dir():
            raise _fail(shown, f"directory {target.parent} does not exist")
        mode = stat.S_IMODE(st.st_mode) & 0o777 if st is not None else 0o666 & ~current_umask()
        _write_replacing(target, text, mode)
    except OSError as exc:
        raise _fail(shown, exc) from exc
    except UnicodeEncodeError as exc:  # a surrogate in a loaded report's string
        raise _fail(shown, f"text not encodable as UTF-8 ({exc.reason})") from exc
