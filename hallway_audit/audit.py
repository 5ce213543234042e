"""The library entry point: audit(checkpoint) -> AuditResult. The CLI is a thin layer over it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .errors import ExitCode, UsageError
from .rules import Outcome, RuleSet, evaluate, gate, load_rules
from .static import StaticResult, run_static
from .static.audit import Progress
from .subjects import static_subjects

DEFAULT_FORMATS = ("bf16", "fp8_e4m3")
DEFAULT_LR = 1e-4
FAIL_ON = ("error", "warning", "never")
_SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class CheckpointSummary:
    path: str
    kind: str
    tensors: int
    params: int
    bytes: int


@dataclass(frozen=True)
class Gate:
    passed: bool
    fail_on: str

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK if self.passed else ExitCode.GATE_FAILED)


@dataclass
class AuditResult:
    checkpoint: CheckpointSummary
    static: StaticResult
    ruleset: RuleSet
    outcomes: list[Outcome]
    gate: Gate
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Outcome]:
        """Fired rules, most severe first, then by layer and setting."""
        fired = [o for o in self.outcomes if o.status == "fired"]
        return sorted(
            fired,
            key=lambda o: (_SEVERITY_RANK[o.rule.severity], o.subject.layer or "", o.subject.setting or "", o.rule.id),
        )

    def to_dict(self) -> dict:
        from .report.schema import result_to_dict

        return result_to_dict(self)


def audit(
    checkpoint: str | os.PathLike,
    *,
    rules: Sequence[str | os.PathLike] = ("default.yaml",),
    formats: Sequence[str] = DEFAULT_FORMATS,
    lr: float = DEFAULT_LR,
    spectral: bool = False,
    fail_on: str = "error",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> AuditResult:
    """Audit a checkpoint against rule files; raises a HallwayError subclass on bad input."""
    if fail_on not in FAIL_ON:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
    if not lr > 0:
        raise UsageError(f"--lr must be a positive number, not {lr!r}")
    ruleset = load_rules(list(rules)) if rules else load_rules([])
    with open_checkpoint(checkpoint) as ckpt:
        static = run_static(ckpt, formats, lr, spectral=spectral, device=device, progress=progress)
        summary = CheckpointSummary(
            path=str(Path(checkpoint)),
            kind=ckpt.kind,
            tensors=len(ckpt.infos()),
            params=sum(i.numel for i in ckpt.infos()),
            bytes=static.bytes_read,
        )
    outcomes = evaluate(ruleset, static_subjects(static))
    notes = ["static audit only: no architecture and calibration batch, so dynamic rules are skipped"]
    return AuditResult(summary, static, ruleset, outcomes, Gate(gate(outcomes, fail_on), fail_on), notes)
