"""A --jobs worker process: opens the checkpoint itself and measures the units it is sent.

Started by parallel.py as a fresh interpreter (`python -c ... main()`, in its own
session), with the current directory and environment of the parent, so paths,
limits (HALLWAY_AUDIT_*) and messages are the parent's. Messages both ways are
plain data (partial.dumps_plain / loads_plain): task numbers, counts and figures,
never pickled objects.

The worker never outlives the audit: it exits when told to stop, when its socket
closes, and -- from a watchdog thread started before torch is imported, even while
it measures -- when the lifeline pipe from the parent reaches end of file, which
the kernel makes happen as soon as the parent exits for any reason, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from .. import limits
from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.base import shown
from ..errors import CheckpointError, HallwayError
from .audit import Cursor, measure_units
from .partial import dumps_plain, loads_plain, unit_to_plain
from .plan import StaticPlan, plan_static

PROGRESS_EVERY_S = 0.1


def peak_rss() -> int:
    """This process's peak resident memory in bytes since reset_peak (Linux: VmHWM), or
    over its whole life (ru_maxrss); 0 where the OS does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Start peak_rss afresh (Linux), so it tells what measuring took, not importing torch."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def failure(exc: BaseException) -> tuple[str, str, int, str]:
    """(kind, class name, exit code, message) of an exception, for the parent to raise again."""
    if isinstance(exc, HallwayError):
        return "hallway", type(exc).__name__, int(exc.exit_code), exc.message
    if limits.is_out_of_memory(exc):
        return "oom", type(exc).__name__, 6, limits.out_of_memory_message(exc)
    text = str(exc)
    if os.environ.get("HALLWAY_AUDIT_DEBUG"):
        text += "\n" + "".join(traceback.format_exception(exc))
    return "internal", type(exc).__name__, 70, text


class _Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ckpt: Checkpoint | None = None
        self.plan: StaticPlan | None = None
        self.lr = 0.0
        self.device = "cpu"
        self.spectral_threads = 1

    def send(self, *msg: Any) -> None:
        self.conn.send_bytes(dumps_plain(msg))

    def setup(self, path: str, reader: str, formats: list[str], lr: float, spectral: bool, device: str,
              threads: int, spectral_threads: int, fingerprint: str) -> None:
        torch.set_num_threads(threads)
        self.lr, self.device, self.spectral_threads = lr, device, spectral_threads
        self.ckpt = open_checkpoint(path, reader=reader)
        self.plan = plan_static(self.ckpt.infos(), formats, spectral=spectral)
        if self.plan.fingerprint() != fingerprint:
            raise CheckpointError(
                f"{shown(path)}: the checkpoint changed while it was being audited "
                "(a worker process found other tensors); audit it again"
            )

    def task(self, tid: int, unit_ids: list[int]) -> None:
        assert self.ckpt is not None and self.plan is not None
        plan, cursor = self.plan, Cursor()
        done, last = 0, time.monotonic()

        def on_tensor(i: int) -> None:
            nonlocal done, last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                self.send("progress", tid, done, plan.infos[i].name)
                last = now
            done += plan.infos[i].nbytes

        try:
            units = [unit_to_plain(r) for r in
                     measure_units(self.ckpt, plan, unit_ids, self.lr, device=self.device, on_tensor=on_tensor,
                                   cursor=cursor, spectral_threads=self.spectral_threads)]
        except Exception as exc:
            self.send("error", tid, cursor.at, *failure(exc))
            return
        self.send("done", tid, units, peak_rss())

    def serve(self) -> None:
        while True:
            try:
                msg = loads_plain(self.conn.recv_bytes())
            except (EOFError, OSError):
                return
            if msg[0] == "stop":
                return
            if msg[0] == "setup":
                try:
                    self.setup(*msg[1:])
                except Exception as exc:
                    self.send("error", None, -1, *failure(exc))
                    continue
                self.send("ready", os.getpid(), current_rss(), peak_rss())
                reset_peak()
            elif msg[0] == "task":
                self.task(*msg[1:])


def main() -> None:
    """The worker process: `python -c ... main()` with argv [paths, socket fd, lifeline fd]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and ends its workers
    worker = _Worker(Connection(int(sys.argv[2])))  # argv[3], the lifeline, is watched by parallel._BOOT
    try:
        worker.serve()
    finally:
        if worker.ckpt is not None:
            worker.ckpt.close()
