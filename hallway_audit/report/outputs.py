"""Several outputs from one run, each checked before the run starts.

An output is a format and a destination (a file, or stdout). Before any
expensive work `check_outputs` refuses, as a usage error (exit 2), an output
that would overwrite a file the run reads (by resolved path or by device and
inode, so symlinks and hard links count) or land inside a checkpoint
directory, and two outputs writing one file; and, as exit 5, an output whose
directory is missing or not writable, or that names a directory or a file that
is neither regular, a character device nor a FIFO. A bad `-o` therefore fails in
a second, not after the whole audit.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, TextIO

from ..errors import OutputError, UsageError
from .base import Formatter, RenderOptions, formatter_names, get_formatter
from .inputs import RunInput
from .layout import report_width
from .write import CHUNK, StagedFile, stage, stream_of, write_through


@dataclass(frozen=True)
class OutputSpec:
    format: str
    path: str | None  # None: stdout
    option: str  # how it was asked for, for messages: "--format json:a.json", "-o a.json"

    @property
    def to_stdout(self) -> bool:
        return self.path is None or stream_of(self.path) == 1


def parse_format(value: str) -> tuple[str, str | None]:
    """`FMT` or `FMT:FILE` (the first colon splits; FILE may hold more)."""
    name, sep, path = value.partition(":")
    name = name.strip()
    if name not in formatter_names():
        get_formatter(name)  # raises UnknownNameError listing the formats
    if sep and not path:
        raise UsageError(f"--format {value}: FILE is empty (write --format {name} for stdout)")
    return name, (path if sep else None)


def output_plan(
    formats: Sequence[str],
    output: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> list[OutputSpec]:
    """The outputs asked for: each `--format FMT[:FILE]` (none: the table on stdout),
    `-o FILE` for the one output without a file, then `--output-FMT FILE` additions."""
    specs = [(*parse_format(v), f"--format {v}") for v in formats]
    if not specs:
        specs = [("table", None, "--format table")]
    if output is not None:
        open_ = [i for i, (_, path, _) in enumerate(specs) if path is None]
        if len(open_) != 1:
            shown = "every --format already names its FILE" if not open_ else "several --format values have no FILE"
            raise UsageError(f"-o {output}: {shown}; write --format FMT:FILE for each file")
        i = open_[0]
        fmt = specs[i][0]
        specs[i] = (fmt, output, f"-o {output}")
    specs += [(fmt, path, f"--output-{fmt} {path}") for fmt, path in extra]
    outputs = [OutputSpec(fmt, path, option) for fmt, path, option in specs]
    on_stdout = [o for o in outputs if o.to_stdout]
    if len(on_stdout) > 1:
        raise UsageError(
            f"{' and '.join(o.option for o in on_stdout)}: only one output can go to stdout; give the others a file "
            "(--format FMT:FILE)"
        )
    return outputs


def _identity(path: str) -> tuple[str, tuple[int, int] | None]:
    try:
        st = os.stat(path)
        inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        inode = None
    return os.path.realpath(path), inode


def _inside(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False


def _check_collisions(out: OutputSpec, real: str, inode: tuple[int, int] | None,
                      inputs: Sequence[tuple[RunInput, str, tuple[int, int] | None]]) -> None:
    for item, in_real, in_inode in inputs:
        if item.directory:
            if _inside(real, in_real):
                raise UsageError(
                    f"{out.option}: {real} is inside {item.what} {item.path}; write reports outside the checkpoint"
                )
            continue
        if real == in_real or (inode is not None and inode == in_inode):
            same = "" if os.path.abspath(out.path or "") == os.path.abspath(item.path) else f" {item.path}"
            raise UsageError(f"{out.option}: {out.path} is {item.what}{same}; refusing to overwrite an input of the run")


def _check_destination(out: OutputSpec, real: str) -> None:
    path = out.path or ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: cannot write the report: is a directory")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            if not os.access(path, os.W_OK):
                raise OutputError(f"{path}: cannot write the report: permission denied")
            return
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: cannot write the report: exists and is not a regular file, a character device or a FIFO")
    directory = os.path.dirname(real) or "."
    if not os.path.isdir(directory):
        raise OutputError(f"{path}: cannot write the report: directory {os.path.dirname(path) or '.'} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the report: directory {os.path.dirname(path) or '.'} is not writable")


def check_outputs(outputs: Sequence[OutputSpec], inputs: Iterable[RunInput]) -> None:
    """Refuse, before the run, outputs that would touch an input, collide, or cannot be written."""
    known = []
    for item in inputs:
        real, inode = _identity(item.path)
        known.append((item, real, inode))
    seen: dict[Any, OutputSpec] = {}
    for out in outputs:
        if out.path is None or stream_of(out.path) is not None:
            continue
        real, inode = _identity(out.path)
        _check_collisions(out, real, inode, known)
        for key in (real, inode):
            if key is not None and key in seen:
                raise UsageError(f"{seen[key].option} and {out.option}: two outputs write {out.path}")
        seen[real] = out
        if inode is not None:
            seen[inode] = out
        _check_destination(out, real)


def wants_color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _options(out: OutputSpec, formatter: Formatter, max_rows: int) -> RenderOptions:
    return RenderOptions(
        color=out.path is None and not formatter.machine and wants_color(sys.stdout),
        width=report_width(out.to_stdout),
        max_rows=max_rows,
    )


def publish(doc: Mapping[str, Any], outputs: Sequence[OutputSpec], *, max_rows: int,
            stdout: TextIO | None = None) -> list[OutputSpec]:
    """Render and write every output; returns those with a file, in order.

    A rendering or writing failure writes none of them: a regular file is rendered
    straight into a temp file beside it (write.stage), and the temp files are renamed
    into place only once every output has rendered; stdout, a device or a FIFO gets
    its text after that (files first, then stdout), from a spool that holds up to
    SPOOL_BYTES in memory and the rest on disk, so that no report is ever one string.
    """
    staged: list[StagedFile | None] = []
    spools: list[IO[str] | None] = []
    try:
        try:
            for out in outputs:
                formatter = get_formatter(out.format)
                options = _options(out, formatter, max_rows)
                target = stage(out.path) if out.path is not None else None
                staged.append(target)
                spools.append(None if target is not None else _spool(out))
                formatter.render_stream(doc, options, target.write if target is not None else _spooler(out, spools[-1]))
            for out, target, spool in zip(outputs, staged, spools, strict=True):
                if target is not None:
                    target.commit()
                elif out.path is not None and spool is not None:
                    write_through(out.path, _pieces(out, spool))
        except BaseException:
            for target in staged:
                if target is not None:
                    target.discard()
            raise
        for out, spool in zip(outputs, spools, strict=True):
            if out.path is None and spool is not None:
                stream = stdout or sys.stdout
                for piece in _pieces(out, spool):
                    stream.write(piece)
                stream.flush()
    finally:
        for spool in spools:
            if spool is not None:
                spool.close()
    return [out for out in outputs if out.path is not None]


SPOOL_BYTES = 32 << 20


def _spool(out: OutputSpec) -> IO[str]:
    # surrogatepass: a lone surrogate (from a loaded report) comes back as it went in,
    # and reaches the stream's own encoding as it did before spooling
    try:
        return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+", encoding="utf-8",
                                             errors="surrogatepass", newline="")
    except OSError as exc:  # pragma: no cover - in memory until SPOOL_BYTES
        raise _spool_error(out, exc) from exc


def _spool_error(out: OutputSpec, exc: OSError) -> OutputError:
    return OutputError(f"{out.path or 'stdout'}: cannot write the report: its temp file failed: {exc.strerror or exc}")


def _spooler(out: OutputSpec, spool: IO[str] | None) -> Callable[[str], Any]:
    assert spool is not None

    def write(text: str) -> None:
        try:
            spool.write(text)
        except OSError as exc:  # the temp directory is full
            raise _spool_error(out, exc) from exc

    return write


def _pieces(out: OutputSpec, spool: IO[str]) -> Iterator[str]:
    """The spooled text, from the start, CHUNK characters at a time."""
    try:
        spool.seek(0)
        while piece := spool.read(CHUNK):
            yield piece
    except OSError as exc:
        raise _spool_error(out, exc) from exc
