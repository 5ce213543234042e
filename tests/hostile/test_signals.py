"""Ctrl-C and SIGTERM through the real CLI: exit 130 / 143, one line, no traceback, no
report (not even a temp file) in the output folder, the inputs unchanged -- whether
the signal arrives while torch is still importing, during the audit, or twice.

The audit is the bundled example with --calib and 500-step bursts (minutes on any
machine), so a signal sent 8 s in finds it mid-run; one sent sooner finds it importing.
Either way the promise is the same, which keeps the test independent of the
machine's speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import Outcome, assert_refused, assert_unchanged, digest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-llama"


def _handles_sigterm(pid: int) -> bool:
    """Has the process installed its SIGTERM handler (the first thing hallway_audit's
    import does)? Before that the signal's default action applies: not ours to test."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def _interrupted_run(tmp_path: Path, signals: list[tuple[float, int]], args: list[str]) -> Outcome:
    """Start the CLI, send each (seconds after its handlers are installed, signal), wait for it to end."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HALLWAY_AUDIT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hallway_audit", *args],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _handles_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        start = time.monotonic()
        for at, sig in signals:
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            if proc.poll() is None:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Outcome(proc.returncode, out, err, time.monotonic() - start, 0.0)


CASES = {
    "sigint-while-importing": ([(0.0, signal.SIGINT)], 130, "interrupted"),
    "sigterm-while-importing": ([(0.0, signal.SIGTERM)], 143, "terminated (SIGTERM)"),
    "sigint-mid-run": ([(8.0, signal.SIGINT)], 130, "interrupted"),
    "sigterm-mid-run": ([(8.0, signal.SIGTERM)], 143, "terminated (SIGTERM)"),
    "sigint-twice": ([(8.0, signal.SIGINT), (8.05, signal.SIGINT)], 130, "interrupted"),
    "sigterm-then-sigint": ([(8.0, signal.SIGTERM), (8.02, signal.SIGINT)], 143, "terminated (SIGTERM)"),
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc (Linux)")
@pytest.mark.parametrize("name", list(CASES))
def test_signal_stops_the_audit_cleanly(tmp_path: Path, name: str) -> None:
    signals, code, needle = CASES[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = out_dir / "report.json"
    before = digest([EXAMPLE])
    args = [str(EXAMPLE), "--calib", str(EXAMPLE / "calib.safetensors"), "--steps", "500",
            "--format", "json", "-o", str(report), "-q"]
    outcome = _interrupted_run(tmp_path, signals, args)
    assert_refused(outcome, code, needle=needle)
    assert outcome.stdout == ""
    assert outcome.stderr.count("\n") == 1, outcome.stderr
    assert list(out_dir.iterdir()) == [], "no report and no temp file may be left"
    assert_unchanged(before, [EXAMPLE])
