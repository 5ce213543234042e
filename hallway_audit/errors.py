"""One exception per failure class, each carrying the exit code the CLI returns.

Exit codes are never reused (semgrep's lesson): 1 means only "the gate failed",
so a CI job can tell a failing model from a broken invocation.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # gate passed
    GATE_FAILED = 1  # findings at or above --fail-on
    USAGE = 2  # bad flags, unknown format / metric name on the command line
    CHECKPOINT = 3  # checkpoint missing, unreadable, corrupt or unsupported
    RULES = 4  # invalid rule file
    OUTPUT = 5  # the report could not be written
    RESOURCES = 6  # out of memory
    MODEL = 7  # the architecture cannot be built or does not match the checkpoint
    DATA = 8  # calibration data or loss unusable: unreadable, wrong shapes, loss not a finite scalar
    DISTRIBUTED = 9  # under torchrun: the ranks could not meet, or one stopped answering (no progress in time)
    INTERNAL = 70  # a bug in hallway-audit (EX_SOFTWARE); please report it


class HallwayError(Exception):
    """Base class: a problem the user can fix, reported as one line, no traceback."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(HallwayError):
    exit_code = ExitCode.USAGE


class UnknownNameError(UsageError):
    """A name looked up in a registry that does not hold it; lists what does."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}. Available: {', '.join(available)}")
        self.kind, self.name, self.available = kind, name, available


class CheckpointError(HallwayError):
    exit_code = ExitCode.CHECKPOINT


class RuleFileError(HallwayError):
    """Every problem found in one or more rule files, each 'file:line: rule id: what'."""

    exit_code = ExitCode.RULES

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "invalid rule file"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more)


class OutputError(HallwayError):
    exit_code = ExitCode.OUTPUT


class ResourceError(HallwayError):
    """Out of memory (host or device): the audit needs a smaller batch or another device."""

    exit_code = ExitCode.RESOURCES


class ModelError(HallwayError):
    """--model factory or HF architecture unusable, or the checkpoint does not fit it."""

    exit_code = ExitCode.MODEL


class DataError(HallwayError):
    """Calibration batch or loss unusable for this model."""

    exit_code = ExitCode.DATA


class DistributedError(HallwayError):
    """Under torchrun: the processes could not rendezvous, or a rank showed no progress
    for HALLWAY_AUDIT_DIST_TIMEOUT seconds while the others waited for it."""

    exit_code = ExitCode.DISTRIBUTED
