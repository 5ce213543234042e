"""Outputs aimed at the run's own inputs, through the real CLI: refused before any work
(exit 2), the inputs unchanged; unwritable destinations are exit 5 before the audit;
devices and the process's own stdout are written through."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .harness import assert_refused, assert_unchanged, digest, run_cli


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"net.0.weight": torch.randn(16, 8, generator=g) * 0.05, "net.1.weight": torch.randn(4, 16, generator=g) * 0.05}


def _case(tmp_path: Path, case: str) -> tuple[list[str], list[Path], int, str]:
    """(arguments, inputs to watch, expected code, needle) for one hostile output."""
    ckpt = tmp_path / "m.safetensors"
    save_file(_weights(), str(ckpt))
    if case == "checkpoint":
        return [str(ckpt), "-o", str(ckpt)], [ckpt], 2, "is the checkpoint"
    if case == "hardlink":
        os.link(ckpt, tmp_path / "report.md")
        return [str(ckpt), "--output-markdown", str(tmp_path / "report.md")], [ckpt], 2, "is the checkpoint"
    if case == "inside-directory":
        d = tmp_path / "hf"
        d.mkdir()
        save_file(_weights(), str(d / "model.safetensors"))
        return [str(d), "--output-json", str(d / "audit.json")], [d], 2, "outside the checkpoint"
    if case == "calib":
        calib = tmp_path / "calib.safetensors"
        save_file({"inputs": torch.randn(16, 8)}, str(calib))
        source = tmp_path / "f.py"
        source.write_text("raise SystemExit('imported: the check came too late')\n")
        return ([str(ckpt), "--calib", str(calib), "--model", f"{source}:build", "--format", f"junit:{calib}"],
                [ckpt, calib, source], 2, "calibration data")
    if case == "missing-directory":
        return [str(ckpt), "-o", str(tmp_path / "no" / "r.txt")], [ckpt], 5, "does not exist"
    raise AssertionError(case)


@pytest.mark.parametrize(
    # (symlinks, directories and two stdout outputs are covered in-process by tests/test_report_outputs.py)
    "case", ["checkpoint", "hardlink", "inside-directory", "calib", "missing-directory"]
)
def test_hostile_outputs_are_refused_and_inputs_untouched(tmp_path, case):
    args, watched, code, needle = _case(tmp_path, case)
    before = digest(watched)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    out = run_cli(args, cwd=tmp_path)
    assert_refused(out, code, needle=needle)
    assert out.stdout == ""
    assert_unchanged(before, watched)
    assert sorted(p.name for p in tmp_path.rglob("*")) == names  # nothing written, no temp file left


def test_devices_and_own_stdout_are_written_through(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    save_file(_weights(), str(ckpt))
    out = run_cli([str(ckpt), "--format", "json:/dev/stdout", "--output-junit", "/dev/null"], cwd=tmp_path)
    assert_refused(out, (0, 1))
    assert json.loads(out.stdout)["gate"]["exit_code"] == out.code
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
