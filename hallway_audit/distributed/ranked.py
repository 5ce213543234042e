"""One audit run by every rank of a torchrun job: the protocol around the work.

Each rank runs the same body (the CLI's audit command, or `audit_distributed`).
Inside it the sweep runs only this rank's settings (`sweep_share`) and meets the
others at the exchange; rank 0 then goes on alone (rules, the report) while the
others stop (`HandedOver`). A rank that fails anywhere posts an abort, still takes
part in the exchange with its error, and every rank ends with the exit code rank 0
posts: the failing rank's code, and one error line naming that rank.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from ..errors import ExitCode, HallwayError
from ..limits import is_out_of_memory, out_of_memory_message
from . import codec
from .assign import assign
from .env import RankEnv
from .session import Cancelled, Decided, RankFailure, Session

if TYPE_CHECKING:
    from ..probe.result import SettingResult
    from ..probe.settings import Setting

T = TypeVar("T")


class HandedOver(Exception):
    """Raised on ranks other than 0 once their part is with rank 0: they stop here."""


_ACTIVE: list[Session] = []


def active() -> Session | None:
    """The session of the run in progress in this process (None: a single process)."""
    return _ACTIVE[-1] if _ACTIVE else None


def worker_rank() -> bool:
    """Is this process a rank other than 0 of a run in progress?"""
    session = active()
    return session is not None and session.rank != 0


@contextmanager
def _activated(session: Session) -> Iterator[Session]:
    _ACTIVE.append(session)
    try:
        yield session
    finally:
        _ACTIVE.remove(session)


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message the CLI would give for `exc`."""
    if isinstance(exc, HallwayError):
        return int(exc.exit_code), exc.message
    if is_out_of_memory(exc):
        return int(ExitCode.RESOURCES), out_of_memory_message(exc)
    return int(ExitCode.INTERNAL), (f"internal error: {type(exc).__name__}: {exc} "
                                    "(set HALLWAY_AUDIT_DEBUG=1 for the traceback; please report it)")


# ---------------------------------------------------------------------------- payloads


def _ok(session: Session, results: Sequence[SettingResult]) -> bytes:
    return codec.dumps({"status": "ok", "results": [codec.to_plain(r) for r in results], "extra": session.handed})


def _failed(code: int, message: str, cancelled: bool) -> bytes:
    return codec.dumps({"status": "cancelled" if cancelled else "failed", "code": code, "message": message})


def _first_failure(parts: list[dict]) -> RankFailure | None:
    """The failure of the lowest failing rank (a cancelled rank only followed another's)."""
    failed = [(r, p) for r, p in enumerate(parts) if p["status"] == "failed"]
    if not failed:
        if any(p["status"] == "cancelled" for p in parts):
            return RankFailure(int(ExitCode.DISTRIBUTED), "a rank stopped on an abort that no rank reported")
        return None
    part = failed[0][1]
    message = str(part["message"])  # names its rank already
    others = [r for r, _ in failed[1:]]
    if others:
        message += f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)"
    return RankFailure(int(part["code"]), message)


def _parts(raw: list[bytes]) -> list[dict]:
    parts = []
    for rank, blob in enumerate(raw):
        try:
            part = codec.loads(blob)
        except ValueError as exc:
            raise RankFailure(int(ExitCode.DISTRIBUTED), f"rank {rank}: its results could not be read: {exc}") from exc
        parts.append(part)
    return parts


# ---------------------------------------------------------------------------- the sweep's part


def sweep_share(settings: Sequence[Setting], costs: Sequence[int]) -> list[int]:
    """Positions of the settings this rank probes (all of them in a single process)."""
    session = active()
    if session is None:
        return list(range(len(settings)))
    return assign([s.id for s in settings], costs, session.world_size)[session.rank]


def gather_results(settings: Sequence[Setting], mine: list[SettingResult]) -> list[SettingResult]:
    """Rank 0: every setting's result, in sweep order (a failure of any rank raises its
    RankFailure). Other ranks hand theirs over and raise HandedOver."""
    session = active()
    if session is None:
        return mine
    raw = session.exchange(_ok(session, mine))
    if raw is None:
        raise HandedOver
    parts = _parts(raw)
    failure = _first_failure(parts)
    if failure is not None:
        raise failure
    session.received = parts
    by_id: dict[str, SettingResult] = {}
    for part in parts:
        for data in part["results"]:
            r = codec.from_plain(data)
            by_id[r.id] = r
    missing = [s.id for s in settings if s.id not in by_id]
    if missing:
        raise RankFailure(int(ExitCode.DISTRIBUTED), f"rank 0: no rank returned the results of {', '.join(missing)}")
    return [by_id[s.id] for s in settings]


def watch_progress(callback: Callable[..., None] | None) -> Callable[..., None] | None:
    """A progress callback that also shows this rank's progress to the others and stops
    it once another rank has failed (unchanged in a single process)."""
    session = active()
    return callback if session is None else session.watch(callback)


# ---------------------------------------------------------------------------- the run


@dataclass
class RankOutcome(Generic[T]):
    value: T | None  # the body's result on rank 0 (None elsewhere, and on failure)
    code: int  # the exit code every rank agreed on
    failure: str | None = None  # the one error line (without "hallway-audit: error: "), on rank 0
    speaks: bool = False  # this rank prints `failure` (rank 0; another rank only when rank 0 could not decide)


def run_ranked(env: RankEnv, body: Callable[[], T], code_of: Callable[[T], int]) -> RankOutcome[T]:
    """Run `body` as rank `env.rank` of the job and agree on the exit code.

    Rank 0 returns its value and code, or the failure of the lowest failing rank
    (its code, its message naming it); other ranks return the same code. An
    interrupt (Ctrl-C, SIGTERM: torchrun forwards them to every rank) is not
    negotiated: it propagates at once.
    """
    session = Session.open(env)
    try:
        with _activated(session):
            return _protocol(session, body, code_of)
    finally:
        session.close()


def _protocol(session: Session, body: Callable[[], T], code_of: Callable[[T], int]) -> RankOutcome[T]:
    value: T | None = None
    failure: RankFailure | None = None
    try:
        value = body()
    except HandedOver:
        pass
    except Decided as decided:  # rank 0 ended the run while this rank waited for the others
        return RankOutcome(None, _acknowledge(session, decided.code))
    except Exception as exc:  # every failure is reported through rank 0
        if os.environ.get("HALLWAY_AUDIT_DEBUG"):
            traceback.print_exc()
        session.abort()
        code, message = describe(exc)
        failure = exc if isinstance(exc, RankFailure) else RankFailure(code, f"rank {session.rank}: {message}")
        if session.exchanged and session.rank != 0:  # failed at or after the exchange: rank 0 may not know
            return RankOutcome(None, int(failure.exit_code), failure.message, speaks=True)
        if not session.exchanged:
            try:
                raw = session.exchange(_failed(code, failure.message, isinstance(exc, Cancelled)))
            except Decided as decided:
                return RankOutcome(None, _acknowledge(session, decided.code))
            except RankFailure as lost:  # the exchange itself failed: this rank says so
                if session.rank == 0:
                    return RankOutcome(None, session.agree(int(lost.exit_code)), lost.message, speaks=True)
                return RankOutcome(None, int(lost.exit_code), lost.message, speaks=True)
            if raw is not None:
                failure = _first_failure(_parts(raw)) or failure
    if session.rank != 0:
        try:
            if not session.exchanged:  # a static-only audit: only the static share to hand in
                session.exchange(_ok(session, []))
            return RankOutcome(None, session.agree(None))
        except Decided as decided:
            return RankOutcome(None, _acknowledge(session, decided.code))
        except RankFailure as lost:  # rank 0 stopped answering: this rank says so
            return RankOutcome(None, int(lost.exit_code), lost.message, speaks=True)
    if failure is None and not session.exchanged:  # the body did not meet the others (a library caller's)
        try:
            raw = session.exchange(_ok(session, []))
            assert raw is not None
            failure = _first_failure(_parts(raw))
        except RankFailure as lost:
            failure = lost
    if failure is not None:
        return RankOutcome(None, session.agree(int(failure.exit_code)), failure.message, speaks=True)
    assert value is not None
    return RankOutcome(value, session.agree(code_of(value)))


def _acknowledge(session: Session, code: int) -> int:
    """Tell rank 0 this rank has read the exit code (so it may take the store down)."""
    with contextlib.suppress(Exception):  # rank 0 is gone: nobody waits for the acknowledgement
        session.store.add("read", 1)
    return code
