"""Keep every file a checkpoint names inside the checkpoint's own folder.

A sharded index's weight_map and an ONNX initializer's external-data `location`
are file names written by whoever made the checkpoint. Followed blindly, an index
naming "/etc/passwd" or "../../secrets" would make the audit open that file and
print its size in an error message; so would a shard that is a symbolic link
leading out of the folder. Names are checked here before anything is opened or
even tested for existence: relative, no "..", and after following links still
inside the folder.

One exception: the Hugging Face hub cache keeps each snapshot's files as links
into the same repository's blobs/ folder (models--org--name/snapshots/REV/x ->
../../blobs/HASH); those are allowed, since refusing them would refuse every
downloaded model.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from hallway_audit import limits
from hallway_audit.errors import CheckpointError
from hallway_audit.safe_load import FileProblem, decode_text, load_json_text, read_regular_file

from .base import shown


def confined(directory: Path, name: str, *, where: str, what: str) -> Path:
    """directory/name, or a CheckpointError when `name` leads outside `directory`.

    `what` names the reference in the message ("shard", "external data file").
    Nothing outside the folder is opened or stat-ed to decide.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        not name
        or "\x00" in name
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise CheckpointError(
            f"{where}: {what} {name!r} is not a file inside the checkpoint's folder: refused"
        )
    path = directory / name
    ensure_inside(directory, path, where=where, what=f"{what} {name!r}")
    return path


def ensure_inside(directory: Path, path: Path, *, where: str, what: str) -> None:
    """Refuse `path` when following its links leads outside `directory` (the target is not shown)."""
    root = directory.resolve()
    target = path.resolve()  # strict=False: follows links, opens nothing
    if target != root and (target.is_relative_to(root) or _hub_cache_blob(root, target)):
        return
    raise CheckpointError(
        f"{where}: {what} is a link that leads outside the checkpoint's folder: refused"
    )


def _hub_cache_blob(root: Path, target: Path) -> bool:
    """root is .../models--x/snapshots/REV and target a file in .../models--x/blobs/."""
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def read_json(path: Path, what: str) -> Any:
    """A checkpoint's JSON metadata (config.json, *.index.json): a regular file of at
    most HALLWAY_AUDIT_MAX_JSON_BYTES, nesting bounded (safe_load), or a
    CheckpointError naming the file -- /dev/zero behind a link is refused, not read."""
    where = shown(path)
    try:
        blob = read_regular_file(path, what=f"{what} file", limit=limits.max_json_bytes(), limit_env=limits.MAX_JSON_BYTES_ENV)
        return load_json_text(decode_text(blob, f"{what} file"))
    except FileProblem as exc:
        text = str(exc)
        raise CheckpointError(f"{where}: malformed {what}: {text}" if "JSON" in text else f"{where}: {text}") from exc
