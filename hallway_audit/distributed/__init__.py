"""Sweeps across processes: one audit run by every rank of a torchrun job.

`torchrun --nproc-per-node N -m hallway_audit CHECKPOINT --calib ...` (or
`hallway-audit` under any launcher that sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT) splits the sweep's settings and the static pass's
tensors across the ranks; each works on cuda:LOCAL_RANK (or the CPU), rank 0 gathers
the results as plain JSON over gloo (nothing is unpickled), evaluates the rules and
writes the one report -- the single process's report, byte for byte -- and every
rank exits with the same code. With WORLD_SIZE absent or 1 nothing changes.
"""

from .api import audit_distributed, ranked_command
from .env import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, RankEnv, rank_env
from .ranked import HandedOver, RankOutcome, active, run_ranked, worker_rank
from .session import RankFailure

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "HandedOver",
    "RankEnv",
    "RankFailure",
    "RankOutcome",
    "active",
    "audit_distributed",
    "rank_env",
    "ranked_command",
    "run_ranked",
    "worker_rank",
]
