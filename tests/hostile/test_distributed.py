"""A torchrun environment that is malformed or leads nowhere: one line, a distinct code, no hang.

The variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
and HALLWAY_AUDIT_DIST_TIMEOUT are read before any work: a bad value is exit 2 naming
the variable; a rank 0 whose peers never come is exit 9 once the timeout has passed.
Nothing the user gave is modified.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .harness import assert_refused, assert_unchanged, digest, run_cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-llama"
GOOD = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


CASES = {
    "world size not a number": ({"WORLD_SIZE": "eight"}, 2, "WORLD_SIZE='eight' is not a whole number"),
    "rank outside the world": ({"RANK": "2"}, 2, "RANK='2' must be 0 to 1"),
    "negative local rank": ({"LOCAL_RANK": "-3"}, 2, "LOCAL_RANK='-3' must be 0 to 1"),
    "no master address": ({"MASTER_ADDR": " "}, 2, "MASTER_ADDR is not set"),
    "port out of range": ({"MASTER_PORT": "99999"}, 2, "MASTER_PORT='99999' must be 1 to 65535"),
    "infinite timeout": ({"HALLWAY_AUDIT_DIST_TIMEOUT": "inf"}, 2, "must be a positive number of seconds"),
    "peers never come": ({"HALLWAY_AUDIT_DIST_TIMEOUT": "2"}, 9, "rank 0: could not meet the other 1 rank(s)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_torchrun_environment_is_refused(tmp_path, case):
    change, code, needle = CASES[case]
    inputs = [EXAMPLE]
    before = digest(inputs)
    env = {**GOOD, "MASTER_PORT": _free_port(), **change}
    outcome = run_cli([str(EXAMPLE), "--calib", str(EXAMPLE / "calib.safetensors"), "-q", "-o", "report.json"],
                      cwd=tmp_path, env=env)
    assert_refused(outcome, code, needle=needle)
    assert not (tmp_path / "report.json").exists()
    assert_unchanged(before, inputs)
