"""Where this process stands in a torchrun job: read from the environment torchrun sets.

torchrun (torch.distributed.run) starts one process per rank with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment; a manual launch (one
`python -m hallway_audit` per rank with those variables set) works the same way.
WORLD_SIZE absent or 1 is the ordinary single process: nothing here applies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError
from ..limits import positive_number

TIMEOUT_ENV = "HALLWAY_AUDIT_DIST_TIMEOUT"
# torch's own default for gloo collectives. A rank that shows no progress for this long
# while the others wait for it ends the run (exit 9): it must exceed the longest phase
# without progress events (loading a model, rank 0 writing a large report).
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempt: str = "0"  # torchrun's restart count: keys of an earlier attempt are not read

    @property
    def is_root(self) -> bool:
        """Rank 0 gathers, evaluates the rules and writes the one report."""
        return self.rank == 0


def _whole(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        raise UsageError(f"{name} is not set: under torchrun every rank needs RANK, LOCAL_RANK, WORLD_SIZE, "
                         "MASTER_ADDR and MASTER_PORT (torchrun sets them)")
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f"at least {low}"
        raise UsageError(f"{name}={raw!r} must be {bound}")
    return value


def timeout_from(env: Mapping[str, str]) -> float:
    """HALLWAY_AUDIT_DIST_TIMEOUT in seconds (a positive number), or the default."""
    raw = env.get(TIMEOUT_ENV, "").strip()
    return positive_number(TIMEOUT_ENV, raw, "seconds") if raw else DEFAULT_TIMEOUT_S


def rank_env(env: Mapping[str, str] | None = None) -> RankEnv | None:
    """This process's place in a torchrun job; None for a single process (WORLD_SIZE
    absent or 1). A malformed variable is a usage error (exit 2) naming it."""
    env = os.environ if env is None else env
    if not env.get("WORLD_SIZE", "").strip():
        return None
    world = _whole(env, "WORLD_SIZE", 1)
    if world == 1:
        return None
    rank = _whole(env, "RANK", 0, world - 1)
    local = _whole(env, "LOCAL_RANK", 0, world - 1)
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        raise UsageError("MASTER_ADDR is not set: the ranks of a torchrun job meet at MASTER_ADDR:MASTER_PORT")
    port = _whole(env, "MASTER_PORT", 1, 65535)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0").strip() or "0"
    return RankEnv(rank, local, world, addr, port, timeout_from(env), attempt)
