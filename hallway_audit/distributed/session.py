"""The ranks of one torchrun job, as the audit uses them: a store to signal through and a
gloo group to gather results with.

The ranks meet twice. At the exchange each rank hands rank 0 its part (its settings'
results, or why it failed); at the agreement rank 0 posts the exit code every rank
then exits with. In between only rank 0 works (rules, the report). While a rank
waits for another at either meeting it watches the other's progress counter, which a
rank bumps as its bursts (and rank 0's static pass) report progress: a rank that
shows none for HALLWAY_AUDIT_DIST_TIMEOUT seconds ends the wait (exit 9). A rank that
fails posts an abort, and the others stop at their next progress event instead of
finishing their settings. Only gloo is used, whatever device the bursts run on: the
collectives carry a few megabytes of CPU bytes once per run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch

from ..errors import DistributedError, ExitCode, HallwayError
from .env import TIMEOUT_ENV, RankEnv

POLL_S = 0.1  # how often a waiting rank looks at the store
BEAT_EVERY_S = 1.0  # at most one progress bump (and abort check) per second per rank


class Cancelled(Exception):
    """Another rank failed: this one stops its settings and joins the exchange."""


class RankFailure(HallwayError):
    """A failure of the run that names its rank ("rank 1: ..."), with the exit code
    every rank ends with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[assignment]


class Decided(Exception):
    """Rank 0 posted the exit code while this rank was still waiting at a meeting."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Session:
    """One rank's handle on the job (open with `Session.open`, end with `close`)."""

    def __init__(self, env: RankEnv, store: Any, group: Any, owns_group: bool) -> None:
        self.env = env
        self.rank = env.rank
        self.world_size = env.world_size
        self.local_rank = env.local_rank
        self.store = store
        self.group = group
        self._owns_group = owns_group
        self._last_beat = 0.0
        self._last_check = 0.0
        self.exchanged = False
        self.handed: dict[str, Any] = {}  # plain data this rank hands in at the exchange besides its results
        self.received: list[dict[str, Any]] | None = None  # rank 0: every rank's part, once exchanged
        self.static_seconds = 0.0

    # ------------------------------------------------------------------ setup
    @classmethod
    def open(cls, env: RankEnv) -> Session:
        """Rendezvous with the other ranks (env://, as torchrun sets it up) and make a gloo group."""
        import torch.distributed as dist

        where = f"{env.master_addr}:{env.master_port}"
        if not dist.is_available():
            raise DistributedError(f"rank {env.rank}: this torch build has no torch.distributed")
        timeout = timedelta(seconds=env.timeout_s)
        try:
            if dist.is_initialized():  # a program that set up its own process group
                base = dist.distributed_c10d._get_default_store()
                group = dist.new_group(backend="gloo", timeout=timeout)
                owns = False
            else:
                base, _, _ = next(dist.rendezvous("env://", timeout=timeout))
                dist.init_process_group("gloo", store=dist.PrefixStore("hallway_audit/pg", base), rank=env.rank,
                                        world_size=env.world_size, timeout=timeout)
                group, owns = None, True
        except Exception as exc:
            raise DistributedError(f"rank {env.rank}: could not meet the other {env.world_size - 1} rank(s) at "
                                   f"{where} within {env.timeout_s:g} s: {_one_line(exc)}") from exc
        store = dist.PrefixStore(f"hallway_audit/{env.attempt}/", base)
        session = cls(env, store, group, owns)
        session.beat(force=True)
        return session

    def close(self) -> None:
        """Leave the job: rank 0 keeps the store up until every rank has read the exit code
        (without torchrun's agent the store lives in rank 0's process)."""
        import torch.distributed as dist

        try:
            if self.rank == 0 and self._has("code"):
                deadline = time.monotonic() + min(self.env.timeout_s, 60.0)
                while int(self.store.add("read", 0)) < self.world_size - 1 and time.monotonic() < deadline:
                    time.sleep(POLL_S)
        except Exception:  # the others are gone already: nothing left to wait for
            pass
        if dist.is_initialized():
            if self._owns_group:
                dist.destroy_process_group()
            elif self.group is not None:  # ours, inside a program's own process group
                dist.destroy_process_group(self.group)

    # ------------------------------------------------------------------ store
    def _store(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise RankFailure(int(ExitCode.DISTRIBUTED), f"rank {self.rank}: lost the job's store at "
                              f"{self.env.master_addr}:{self.env.master_port} while {what}: {_one_line(exc)}") from exc

    def _has(self, key: str) -> bool:
        return bool(self._store(f"looking up {key}", lambda: self.store.check([key])))

    def beat(self, force: bool = False) -> None:
        """Show progress to ranks that may be waiting for this one."""
        now = time.monotonic()
        if force or now - self._last_beat >= BEAT_EVERY_S:
            self._last_beat = now
            self._store("reporting progress", lambda: self.store.add(f"beat/{self.rank}", 1))

    def abort(self) -> None:
        """Tell the other ranks to stop their settings: this one failed."""
        with contextlib.suppress(Exception):  # the store is gone: the others will find out by themselves
            self.store.set("abort", str(self.rank))

    def check(self) -> None:
        """Bump this rank's progress and stop (Cancelled) once another rank has aborted."""
        self.beat()
        now = time.monotonic()
        if now - self._last_check >= BEAT_EVERY_S:
            self._last_check = now
            if self._has("abort"):
                failed = self._store("reading the abort", lambda: self.store.get("abort")).decode()
                raise Cancelled(f"rank {failed} failed")

    def watch(self, callback: Callable[..., None] | None) -> Callable[..., None]:
        """`callback` (or nothing), preceded by a progress bump and the abort check."""

        def watched(*args: Any) -> None:
            self.check()
            if callback is not None:
                callback(*args)

        return watched

    # ------------------------------------------------------------------ waiting
    def _wait(self, keys: Mapping[int, str], what: str) -> None:
        """Until every rank of `keys` has set its key. A rank whose progress counter stays
        still for the timeout ends the wait (RankFailure, exit 9); rank 0's exit code,
        once posted, ends it too (Decided)."""
        seen: dict[int, tuple[int, float]] = {}
        while True:
            missing = [r for r, k in keys.items() if not self._has(k)]
            if not missing:
                return
            if self.rank != 0 and self._has("code"):
                raise Decided(int(self._store("reading the exit code", lambda: self.store.get("code"))))
            now = time.monotonic()
            for r in missing:
                count = self._progress_of(r)
                last = seen.get(r)
                if last is None or last[0] != count:
                    seen[r] = (count, now)
                elif now - last[1] > self.env.timeout_s:
                    raise RankFailure(
                        int(ExitCode.DISTRIBUTED),
                        f"rank {r}: no progress for {self.env.timeout_s:g} s while rank {self.rank} waited for it "
                        f"{what} ({TIMEOUT_ENV} sets the limit)",
                    )
            time.sleep(POLL_S)

    def _progress_of(self, rank: int) -> int:
        key = f"beat/{rank}"
        return int(self._store("reading progress", lambda: self.store.add(key, 0)))

    # ------------------------------------------------------------------ meetings
    def exchange(self, payload: bytes) -> list[bytes] | None:
        """Every rank's payload, in rank order, on rank 0 (None elsewhere): sizes first,
        then the bytes padded to the longest, through gloo."""
        import torch.distributed as dist

        if self.exchanged:
            raise RuntimeError("a rank takes part in one exchange per run")
        self.exchanged = True
        self._store("arriving at the exchange", lambda: self.store.set(f"arrived/{self.rank}", "1"))
        self._wait({r: f"arrived/{r}" for r in range(self.world_size) if r != self.rank}, "to hand in its results")
        try:
            size = torch.tensor([len(payload)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group)
            longest = max(int(s) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if payload:
                mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(mine, bufs, dst=self._global(0), group=self.group)
        except Exception as exc:
            raise RankFailure(int(ExitCode.DISTRIBUTED),
                              f"rank {self.rank}: gathering the results failed: {_one_line(exc)}") from exc
        if bufs is None:
            return None
        return [bytes(b[: int(n)].numpy().tobytes()) for b, n in zip(bufs, sizes, strict=True)]

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def agree(self, code: int | None) -> int:
        """Rank 0 posts `code`; the others wait for it. Returns the code every rank exits with."""
        if self.rank == 0:
            assert code is not None
            text = str(int(code))
            self._store("posting the exit code", lambda: self.store.set("code", text))
            return int(code)
        try:
            self._wait({0: "code"}, "to post the exit code")
        except Decided as decided:
            code = decided.code
        else:
            code = int(self._store("reading the exit code", lambda: self.store.get("code")))
        self._store("confirming the exit code", lambda: self.store.add("read", 1))
        return code
