"""--jobs: the static audit's units measured by several processes, merged as one.

The plan (plan.py) is cut into tasks of consecutive units of about equal bytes. The
parent measures tasks itself, so it works while the workers start (a worker
imports torch: about 2 s), and jobs - 1 worker processes take the others: each
opens the checkpoint itself, reads only its tasks' tensors, and sends back plain
counts (worker.py). The parent merges them in plan order (partial.Merger): the
result is the one --jobs 1 gives, bit for bit.

Workers are fresh interpreters (`python -c`, as multiprocessing's spawn starts
them, never a fork of this process and its torch threads), started through
subprocess rather than multiprocessing: spawn and forkserver re-run the caller's
main script in every worker, which in a script without an `if __name__ ==
"__main__"` guard would start the audit again in each one. Each runs in its own
session, so a Ctrl-C at the terminal reaches only the parent, which ends them.

Failures come out as with --jobs 1. Each carries where one process would have
met it (the tensor's index); once one is known, tasks that start beyond it are
dropped, those before it still run, and the earliest failure is raised: the same
error line and exit code whatever the split. A worker killed by SIGKILL (what
the kernel's out-of-memory killer sends) is exit 6; Ctrl-C or SIGTERM in the
parent ends every worker before the parent exits, and a worker whose parent
vanished exits by itself (worker.py's lifeline).

Only where it pays: a CPU audit of safetensors files (memory-mapped, so a worker
opens them in milliseconds) of at least PARALLEL_FROM_MB (a quarter of it with a
scaled format).
"""

from __future__ import annotations

import builtins
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import IO, Any, Literal

import torch

from .. import errors, interrupt, limits
from ..checkpoint import Checkpoint
from ..errors import HallwayError, ResourceError
from . import measure
from .audit import Cursor, Progress, measure_units
from .partial import Merger, UnitResult, dumps_plain, loads_plain, unit_from_plain
from .plan import StaticPlan
from .result import StaticResult

# Below this a checkpoint is audited in one process. A worker takes 1.5-4 s to start (a
# fresh interpreter importing torch) while the parent alone measures 100-300 MB/s of plain
# formats, 20-60 MB/s with a scaled one: bench/static_jobs.py on 2 busy cores (load 5) put
# the break-even near 0.5 GB with bf16,fp8_e4m3 (0.34 GB: 1.4x slower in parallel; 0.5 GB:
# even; 1.34 GB: 1.2x faster) and below 0.34 GB with int8 (1.15x faster there).
PARALLEL_FROM_ENV = "HALLWAY_AUDIT_PARALLEL_FROM_MB"
PARALLEL_FROM_MB = 512
SCALED_DIVISOR = 4  # with a scaled format (int8, nf4, mx*...): from PARALLEL_FROM_MB / 4
MAX_JOBS = 1024
_READERS = ("safetensors", "safetensors-sharded", "hf")  # reopened by name in the workers
# Tasks: about TASKS_PER_JOB per process for balance, each between these sizes; a task of
# many tiny tensors is also cut at MAX_TASK_TENSORS (its reply carries one tally per tensor).
TASKS_PER_JOB = 4
MIN_TASK_BYTES, MAX_TASK_BYTES = 64 * 1024, 256 * 1024 * 1024
MAX_TASK_TENSORS = 2048
_JOIN_S = 2.0


def parallel_from_bytes(plan: StaticPlan | None = None) -> int:
    """The checkpoint size from which --jobs starts workers: PARALLEL_FROM_MB (or the
    environment's), a quarter of it when a format is scaled (each byte costs ~4x more)."""
    base = _parallel_from_env()
    return base // SCALED_DIVISOR if plan is not None and not plan.batchable else base


def _parallel_from_env() -> int:
    raw = os.environ.get(PARALLEL_FROM_ENV, "").strip()
    if raw:
        try:
            mb = float(raw)
        except ValueError:
            raise errors.UsageError(f"{PARALLEL_FROM_ENV}={raw!r} is not a number of MB") from None
        if not mb >= 0:
            raise errors.UsageError(f"{PARALLEL_FROM_ENV}={raw!r} must be 0 or more")
        return int(mb * 1e6)
    return PARALLEL_FROM_MB * 1_000_000


@dataclass
class Task:
    tid: int
    units: list[int]
    first: int  # the smallest tensor index in it: where its earliest possible failure is
    nbytes: int
    state: Literal["pending", "running", "done", "failed", "dropped"] = "pending"
    done_bytes: int = 0


def make_tasks(plan: StaticPlan, jobs: int) -> list[Task]:
    """Consecutive units in plan order, cut at about total / (jobs x TASKS_PER_JOB) bytes."""
    target = min(MAX_TASK_BYTES, max(MIN_TASK_BYTES, plan.total_bytes // (jobs * TASKS_PER_JOB)))
    tasks: list[Task] = []
    units: list[int] = []
    nbytes = tensors = 0
    first = len(plan.infos)

    def cut() -> None:
        nonlocal units, nbytes, tensors, first
        tasks.append(Task(len(tasks), units, first, nbytes))
        units, nbytes, tensors, first = [], 0, 0, len(plan.infos)

    for uid, unit in enumerate(plan.units):
        units.append(uid)
        nbytes += sum(plan.infos[i].nbytes for i in unit.members)
        tensors += len(unit.members)
        first = min(first, unit.members[0])
        if nbytes >= target or tensors >= MAX_TASK_TENSORS:
            cut()
    if units:
        cut()
    return tasks


def parallel_jobs(checkpoint: Checkpoint, plan: StaticPlan, jobs: int, device: str | torch.device) -> int:
    """How many processes to use for `jobs`: 1 (in-process) unless it pays and workers
    can reopen the checkpoint: a CPU audit, a built-in safetensors reader, at least
    parallel_from_bytes(plan), and at least two tasks; never more than the tasks, nor
    than the available memory holds."""
    if jobs <= 1 or torch.device(device).type != "cpu":
        return 1
    if checkpoint.kind not in _READERS or not type(checkpoint).__module__.startswith("hallway_audit.checkpoint."):
        return 1
    if not all(i.source.name.endswith(".safetensors") for i in plan.infos):
        return 1
    if os.name != "posix":  # workers get their pipes by file descriptor (subprocess pass_fds)
        return 1
    if plan.total_bytes < parallel_from_bytes(plan):
        return 1
    return max(1, min(jobs, len(make_tasks(plan, jobs)), _room_for(plan)))


# What a worker holds besides the tensor it measures: the interpreter with torch imported.
WORKER_BASE_BYTES = 300 * 1024 * 1024


def _room_for(plan: StaticPlan) -> int:
    """Processes the host's available memory holds (the parent's included), each with torch
    and the largest tensor's measurement (five float32 copies for scaled formats, as
    audit._check_fits counts them; plain formats stream in chunks)."""
    largest = max((i.numel for i in plan.infos), default=0)
    each = WORKER_BASE_BYTES + (5 * 4 * largest if not plan.batchable else 4 * measure.CHUNK * 8)
    available, _ = limits.available_memory("cpu")
    return 1 + int(available // each)


@dataclass
class WorkerStats:
    """One worker process's share, for benchmarks and tests (not in the report)."""

    pid: int
    tasks: int = 0
    bytes: int = 0
    start_rss: int = 0  # resident memory once it had opened the checkpoint
    start_peak: int = 0  # the most it had held by then (importing torch, opening)
    peak_rss: int = 0  # the most it held while measuring (Linux; elsewhere over its life)


@dataclass(order=True)
class _Failure:
    at: int  # where one process would have met it
    exc: BaseException = field(compare=False)


def _rebuild(kind: str, name: str, code: int, message: str) -> BaseException:
    """The exception a worker reported, as the parent raises it: the same class for the
    library's errors and built-in exceptions, so the CLI prints the same line."""
    if kind == "oom":
        return ResourceError(message)
    cls = getattr(errors, name, None) if kind == "hallway" else getattr(builtins, name, None)
    if kind == "hallway":
        if not (isinstance(cls, type) and issubclass(cls, HallwayError)):
            cls = HallwayError
        exc = cls.__new__(cls)
        HallwayError.__init__(exc, message)
        exc.exit_code = errors.ExitCode(code)
        return exc
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # a built-in class with another signature
            pass
    return RuntimeError(f"{name} in a static audit worker: {message}")


def _death(pid: int, code: int | None, what: str, last_words: str = "") -> BaseException:
    """A worker that ended without a word: killed (SIGKILL: out of memory), stopped, or crashed."""
    if code is not None and code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return ResourceError(
                f"out of memory (host): static audit worker (pid {pid}) was killed by SIGKILL, as the kernel's "
                f"out-of-memory killer does, while {what}; use fewer --jobs (each worker holds about one tensor) "
                "or --jobs 1"
            )
        if sig == signal.SIGTERM:
            return interrupt.Terminated()
        if sig == signal.SIGINT:
            return KeyboardInterrupt()
        return RuntimeError(f"static audit worker (pid {pid}) died of {name} while {what}")
    said = f" ({last_words})" if last_words else ""
    return RuntimeError(f"static audit worker (pid {pid}) exited with code {code} while {what}{said}")


class _Board:
    """Tasks and failures shared by the parent and the threads that talk to workers."""

    def __init__(self, plan: StaticPlan, tasks: list[Task]) -> None:
        self.plan = plan
        self.tasks = tasks
        self.lock = threading.Lock()
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.failure: _Failure | None = None
        self.stopping = False
        self._next = 0

    def needed(self, task: Task) -> bool:
        return self.failure is None or task.first < self.failure.at

    def take(self) -> Task | None:
        with self.lock:
            while self._next < len(self.tasks):
                task = self.tasks[self._next]
                self._next += 1
                if self.stopping:
                    return None
                if self.needed(task):
                    task.state = "running"
                    return task
                task.state = "dropped"
            return None

    def fail(self, task: Task | None, at: int, exc: BaseException) -> None:
        with self.lock:
            if task is not None:
                task.state = "failed"
            if self.failure is None or at < self.failure.at:
                self.failure = _Failure(at, exc)

    def finished(self) -> bool:
        with self.lock:
            return all(t.state in ("done", "failed", "dropped") or not self.needed(t) for t in self.tasks)

    def where(self, task: Task | None) -> str:
        if task is None:
            return "starting"
        members = [i for u in task.units for i in self.plan.units[u].members]
        first, last = self.plan.infos[min(members)].name, self.plan.infos[max(members)].name
        return f"measuring tensors {first!r} to {last!r}" if first != last else f"measuring tensor {first!r}"


# The worker's program, argv [import path, socket fd, lifeline fd]. The lifeline is watched
# before anything is imported: a worker whose parent died while it imported torch exits at once.
_BOOT = """
import json, os, sys, threading
def watch(fd):
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os._exit(1)
threading.Thread(target=watch, args=(int(sys.argv[3]),), daemon=True).start()
sys.path[:0] = json.loads(sys.argv[1])
from hallway_audit.static.worker import main
main()
"""


class _Slot:
    """One worker process and the parent's thread that feeds it tasks."""

    def __init__(self, board: _Board, setup: tuple[Any, ...]) -> None:
        self.board = board
        self.setup = setup
        self.lock = threading.Lock()
        self.started = self.cancelled = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.life_w: int | None = None
        self.stderr: IO[bytes] | None = None
        self.stats: WorkerStats | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="hallway-audit-static-feed")

    def _start(self) -> None:
        mine, theirs = socket.socketpair()
        life_r, life_w = os.pipe()  # the worker exits when this reaches end of file: when we exit
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115  closed in reap(), after the worker ended
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps([p for p in sys.path if p]), str(theirs.fileno()), str(life_r)],
                pass_fds=(theirs.fileno(), life_r), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self.stderr, start_new_session=True,
            )
        except BaseException:
            mine.close()
            os.close(life_w)
            raise
        finally:
            theirs.close()
            os.close(life_r)
        with self.lock:
            self.proc, self.conn, self.life_w = proc, Connection(mine.detach()), life_w
            self.started = True
            if self.cancelled:  # the audit ended while this worker was starting
                self._end()

    def _recv(self) -> tuple[Any, ...]:
        assert self.conn is not None
        return loads_plain(self.conn.recv_bytes())

    def _send(self, *msg: Any) -> None:
        assert self.conn is not None
        self.conn.send_bytes(dumps_plain(msg))

    def _run(self) -> None:
        task: Task | None = None
        try:
            try:
                self._start()
            except Exception as exc:
                self.board.events.put(("start_failed", exc))
                return
            if self.cancelled:
                return
            self._send("setup", *self.setup)
            msg = self._recv()
            if msg[0] == "error":
                self.board.events.put(("error", None, *msg[2:]))
                return
            self.stats = WorkerStats(pid=int(msg[1]), start_rss=int(msg[2]), start_peak=int(msg[3]))
            while (task := self.board.take()) is not None:
                self._send("task", task.tid, task.units)
                while (msg := self._recv())[0] == "progress":
                    self.board.events.put(msg)
                if msg[0] == "done":
                    _, tid, units, peak = msg
                    self.stats.tasks += 1
                    self.stats.bytes += task.nbytes
                    self.stats.peak_rss = int(peak)
                    self.board.events.put(("done", tid, [unit_from_plain(u) for u in units]))
                else:
                    self.board.events.put(msg)
                task = None
            self._send("stop")
        except (EOFError, OSError):
            if self.board.stopping or self.proc is None:
                return
            try:
                code = self.proc.wait(_JOIN_S)
            except subprocess.TimeoutExpired:
                code = None
            self.board.events.put(("died", task.tid if task else None, self.proc.pid, code, self._last_words()))
        except Exception as exc:  # a bug here: said once, by the parent, as an internal error
            if not self.board.stopping:
                self.board.events.put(("crashed", exc))

    def _last_words(self) -> str:
        """The last line the worker wrote to stderr (a crash outside its own error handling)."""
        if self.stderr is None:
            return ""
        try:
            self.stderr.seek(0)
            lines = [line for line in self.stderr.read()[-4096:].decode(errors="replace").splitlines() if line.strip()]
        except (OSError, ValueError):
            return ""
        return lines[-1].strip() if lines else ""

    def _end(self) -> None:
        if self.life_w is not None:
            os.close(self.life_w)
            self.life_w = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> None:
        """End the worker now (idempotent); the feeding thread then sees end of file."""
        with self.lock:
            self.cancelled = True
            self._end()

    def reap(self) -> None:
        with self.lock:
            proc = self.proc
        if proc is not None:
            try:
                proc.wait(_JOIN_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_JOIN_S)
        self.thread.join(0.1 if proc is None else _JOIN_S)
        with self.lock:
            if self.conn is not None:
                self.conn.close()
            if self.stderr is not None:
                self.stderr.close()


class _Run:
    def __init__(self, checkpoint: Checkpoint, plan: StaticPlan, lr: float, tasks: list[Task],
                 device: str | torch.device, progress: Progress | None, threads: int) -> None:
        self.threads = threads  # one process's torch threads: the SVDs of --spectral run on as many
        self.checkpoint, self.plan, self.lr, self.device, self.progress = checkpoint, plan, lr, device, progress
        self.board = _Board(plan, tasks)
        self.merger = Merger(plan, lr)
        self.total = plan.total_bytes
        self.done_bytes = 0  # of finished tasks
        self.name = ""

    def report(self) -> None:
        if self.progress is not None:
            running = sum(t.done_bytes for t in self.board.tasks if t.state == "running")
            self.progress(min(self.done_bytes + running, self.total), self.total, self.name)

    def pump(self, wait: float = 0.0) -> None:
        """Handle what the workers said: results into the merge, failures, progress."""
        try:
            event = self.board.events.get(timeout=wait) if wait else self.board.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self.board.events.get_nowait()
            except queue.Empty:
                break
        self.report()

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        task = self.board.tasks[event[1]] if kind in ("progress", "done", "error", "died") and event[1] is not None else None
        if kind == "progress":
            assert task is not None
            task.done_bytes, self.name = int(event[2]), str(event[3])
        elif kind == "done":
            assert task is not None
            self.finish(task, event[2])
        elif kind == "error":
            _, _, at, fkind, name, code, message = event
            self.board.fail(task, int(at), _rebuild(fkind, name, int(code), message))
        elif kind == "died":
            _, _, pid, code, last_words = event
            self.board.fail(task, task.first if task else -1, _death(pid, code, self.board.where(task), last_words))
        elif kind == "start_failed":
            self.board.fail(None, -1, ResourceError(
                f"cannot start static audit worker processes ({type(event[1]).__name__}: {event[1]}); use --jobs 1"))
        elif kind == "crashed":
            self.board.fail(None, -1, event[1])

    def finish(self, task: Task, results: list[UnitResult]) -> None:
        with self.board.lock:
            task.state = "done"
        self.done_bytes += task.nbytes
        for result in results:
            self.merger.add(result)

    def run_here(self, task: Task) -> None:
        """Measure one task in this process, handling the workers' news between tensors."""
        cursor = Cursor()

        class Dropped(Exception):
            pass

        def on_tensor(i: int) -> None:
            self.pump()
            if not self.board.needed(task):
                raise Dropped
            self.name = self.plan.infos[i].name
            self.report()
            task.done_bytes += self.plan.infos[i].nbytes

        try:
            results = list(measure_units(self.checkpoint, self.plan, task.units, self.lr, device=self.device,
                                         on_tensor=on_tensor, cursor=cursor, spectral_threads=self.threads))
        except Dropped:
            with self.board.lock:
                task.state = "dropped"
            return
        except Exception as exc:  # raised as it is once it proves the earliest
            self.board.fail(task, cursor.at, exc)
            return
        self.finish(task, results)


def run_parallel(
    checkpoint: Checkpoint,
    plan: StaticPlan,
    lr: float,
    *,
    jobs: int,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    parent_measures: bool = True,
    stats: Callable[[list[WorkerStats]], None] | None = None,
) -> StaticResult:
    """The static audit of `plan` in `jobs` processes: this one and jobs - 1 workers
    (`parent_measures=False`: `jobs` workers, this process only merging)."""
    start = time.perf_counter()
    tasks = make_tasks(plan, jobs)
    threads = torch.get_num_threads()
    run = _Run(checkpoint, plan, lr, tasks, device, progress, threads)
    n_workers = max(1, min(jobs - 1 if parent_measures else jobs, len(tasks)))
    each = max(1, threads // jobs)
    setup = (os.fspath(checkpoint.path), checkpoint.kind, list(plan.formats), lr, plan.spectral,
             str(device), each, threads, plan.fingerprint())
    slots = [_Slot(run.board, setup) for _ in range(n_workers)]
    torch.set_num_threads(each)
    try:
        for slot in slots:
            slot.thread.start()
        while not run.board.finished():
            alone = not any(slot.thread.is_alive() for slot in slots)  # every worker has ended
            task = run.board.take() if parent_measures or alone else None
            if task is not None:
                run.run_here(task)
            else:
                run.pump(wait=0.05)
        run.pump()
        if run.board.failure is not None:
            raise run.board.failure.exc
        result = run.merger.result(time.perf_counter() - start)
    finally:
        with run.board.lock:
            run.board.stopping = True
        for slot in slots:
            slot.stop()
        for slot in slots:
            slot.reap()
        torch.set_num_threads(threads)
    if stats is not None:
        stats([s.stats for s in slots if s.stats is not None])
    if progress is not None:
        progress(run.total, run.total, "")
    return result
