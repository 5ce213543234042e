"""Run the CLI on a hostile input the way a user would, and check the promises of
the README's "Exit codes" section: a distinct exit code, one line on stderr, no
traceback, the inputs unchanged, bounded time and bounded peak memory.

Each case runs `python -m hallway_audit` in its own process (a hang or a memory
blow-up must not take the test session with it), polled with psutil for its peak
resident memory, killed at the time limit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

TIME_LIMIT_S = 90.0  # generous: a case that is refused should take seconds
MEMORY_LIMIT_MB = 1500.0  # peak RSS; torch + transformers alone are ~500 MB


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float


def digest(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every regular file under `paths` (files or directories); links are not followed."""
    out: dict[str, str] = {}
    for given in paths:
        root = Path(given)
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if f.is_symlink() or not f.is_file():
                continue
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = TIME_LIMIT_S,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> Outcome:
    """`python -m hallway_audit ARGS` in a fresh process, with its peak RSS (children included)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "120", **(env or {})}
    full_env.pop("HALLWAY_AUDIT_DEBUG", None)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hallway_audit", *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = psutil.Process(proc.pid)
    peak = 0.0
    try:
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        while proc.poll() is None:
            try:
                rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            if time.monotonic() - start > timeout:
                proc.kill()
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return Outcome(proc.returncode, out, err, time.monotonic() - start, peak)


def assert_refused(
    outcome: Outcome,
    codes: int | Iterable[int],
    *,
    needle: str | None = None,
    max_seconds: float = TIME_LIMIT_S,
    max_mb: float = MEMORY_LIMIT_MB,
) -> None:
    """The case ended in time and memory with an expected code and one clean error line."""
    allowed = {codes} if isinstance(codes, int) else set(codes)
    assert outcome.seconds < max_seconds, f"took {outcome.seconds:.0f} s (killed?): {outcome.stderr[-500:]}"
    assert outcome.peak_mb < max_mb, f"peak RSS {outcome.peak_mb:.0f} MB"
    assert outcome.code in allowed, f"exit {outcome.code}, expected {sorted(allowed)}: {outcome.stderr[-800:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if "error" in line.lower()]
    if outcome.code not in (0, 1):
        assert len(errors) == 1, f"expected one error line, got: {outcome.stderr!r}"
        if needle is not None:
            assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"


def assert_unchanged(before: dict[str, str], paths: Iterable[Path]) -> None:
    after = digest(paths)
    assert after == before, f"inputs changed: {sorted(k for k in before if after.get(k) != before[k])}"
