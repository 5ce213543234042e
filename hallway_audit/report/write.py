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

`stage(path)` is the first half of that for a regular file: the text goes to the
temp file as it is rendered, and `commit` renames it into place, so several
outputs of one run are each complete or untouched, and a large report never has
to be one string (outputs.publish).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
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


def _write_stream(fd: int, pieces: Iterable[str]) -> None:
    stream = sys.stdout if fd == 1 else sys.stderr
    for piece in pieces:
        stream.write(piece)
    stream.flush()


def _write_through(target: str, pieces: Iterable[str]) -> None:
    """A device or FIFO: open for writing (no create, no truncate) and write."""
    fd = os.open(target, os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for piece in pieces:
            handle.write(piece)


CHUNK = 1 << 20  # characters encoded at a time: a 400 MB report is never one bytes object


class StagedFile:
    """A report written to a temp file beside its target, renamed over it by `commit`:
    until then the target is untouched, and `discard` removes the temp file."""

    def __init__(self, shown: str, target: Path, mode: int) -> None:
        self.shown, self.target, self.mode = shown, target, mode
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise _fail(shown, exc) from exc
        self.handle = os.fdopen(fd, "w", encoding="utf-8")
        self.done = False

    def write(self, text: str) -> None:
        try:
            for start in range(0, len(text), CHUNK):
                self.handle.write(text[start:start + CHUNK])
        except OSError as exc:
            raise _fail(self.shown, exc) from exc
        except UnicodeEncodeError as exc:  # a surrogate in a loaded report's string
            raise _fail(self.shown, f"text not encodable as UTF-8 ({exc.reason})") from exc

    def commit(self) -> None:
        try:
            with self.handle:
                self.handle.flush()
                os.fchmod(self.handle.fileno(), self.mode)
                os.fsync(self.handle.fileno())
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise _fail(self.shown, exc) from exc
        self.done = True
        with contextlib.suppress(OSError):  # durability of the rename; not every filesystem allows it
            dir_fd = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        if self.done:
            return
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        self.done = True


def stage(path: str | os.PathLike[str]) -> StagedFile | None:
    """A StagedFile for a regular file (a symlink's target) or a new name; None for what
    is written through rather than replaced: the process's stdout/stderr, a character
    device, a FIFO. OutputError (exit 5) for anything else, or a missing directory."""
    shown = os.fspath(path)
    if stream_of(path) is not None:
        return None
    try:
        try:
            st = os.stat(shown)  # follows symlinks
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            return None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _fail(shown, "exists and is not a regular file, a character device or a FIFO")
        target = Path(os.path.realpath(shown))  # a symlink's target; the link itself stays
        if not target.parent.is_dir():
            raise _fail(shown, f"directory {target.parent} does not exist")
        mode = stat.S_IMODE(st.st_mode) & 0o777 if st is not None else 0o666 & ~current_umask()
    except OSError as exc:
        raise _fail(shown, exc) from exc
    return StagedFile(shown, target, mode)


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` as described in the module docstring; OutputError (exit 5) on failure."""
    staged = stage(path)
    if staged is None:
        write_through(path, text)
        return
    try:
        staged.write(text)
        staged.commit()
    except BaseException:
        staged.discard()
        raise


def write_through(path: str | os.PathLike[str], text: str | Iterable[str]) -> None:
    """Write to the process's stdout/stderr, a character device or a FIFO (see `stage`);
    `text` may come in pieces."""
    shown = os.fspath(path)
    fd = stream_of(path)
    pieces = [text] if isinstance(text, str) else text
    try:
        if fd is not None:
            _write_stream(fd, pieces)
        else:
            _write_through(shown, pieces)
    except OSError as exc:
        raise _fail(shown, exc) from exc
    except UnicodeEncodeError as exc:  # a surrogate in a loaded report's string
        raise _fail(shown, f"text not encodable as UTF-8 ({exc.reason})") from exc
