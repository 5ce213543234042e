"""The two ways in: `audit_distributed` for Python programs, `ranked_command` for the CLI."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import interrupt
from .env import rank_env
from .ranked import run_ranked
from .session import RankFailure

if TYPE_CHECKING:
    from ..audit import AuditResult

F = TypeVar("F", bound=Callable[..., int])


def audit_distributed(checkpoint: str | os.PathLike, plan: Any = None, **kwargs: Any) -> AuditResult | None:
    """`audit()` as one rank of a torchrun job: the sweep's settings are split across the
    ranks, and rank 0 returns the AuditResult of the whole sweep while the others return
    None. A failure on any rank raises RankFailure on every rank, with the failing rank's
    exit code and, on rank 0, its message. Outside torchrun (WORLD_SIZE absent or 1)
    it is `audit()`. Progress callbacks are called on rank 0 only."""
    from ..audit import audit

    env = rank_env()
    if env is None:
        return audit(checkpoint, plan, **kwargs)
    if not env.is_root:
        kwargs = {**kwargs, "progress": None, "burst_progress": None}
    out = run_ranked(env, lambda: audit(checkpoint, plan, **kwargs), lambda r: r.gate.exit_code)
    if out.failure is not None:
        raise RankFailure(out.code, out.failure)
    if out.value is None and out.code not in (0, 1):
        raise RankFailure(out.code, f"rank {env.rank}: the run failed on another rank (exit {out.code}); rank 0 says why")
    return out.value


def ranked_command(command: F) -> F:
    """Run a CLI command (returning its exit code) as every rank of a torchrun job:
    ranks other than 0 are quiet, the exit code is agreed, and only the rank that knows
    the failure prints its one line. Unchanged outside torchrun."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        env = rank_env()
        if env is None:
            return command(*args, **kwargs)
        if not env.is_root and "quiet" in kwargs:
            kwargs["quiet"] = True
        elif env.is_root and not kwargs.get("quiet"):
            sys.stderr.write(f"hallway-audit: rank 0 of {env.world_size} (torchrun): the sweep's settings and the "
                             "static pass are split across the ranks; the progress below is rank 0's share\n")
        out = run_ranked(env, lambda: command(*args, **kwargs), int)
        # The code is decided: a SIGTERM from torchrun, sent to the slower ranks once a
        # faster one has exited non-zero, must not turn it into 143.
        interrupt.ignore_at_exit()
        if out.speaks and out.failure is not None:
            raise RankFailure(out.code, out.failure)
        return out.code

    return wrapper  # type: ignore[return-value]
