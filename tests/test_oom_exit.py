"""torch's CPU allocator failing inside a user's --model factory or --loss is out of
memory (exit 6, the host message), not a model error (7) or a data error (8):
its plain RuntimeError reaches the CLI's out-of-memory mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.cli import main
from hallway_audit.errors import ExitCode

ALLOC_FAIL = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
              "you tried to allocate 275000000000 bytes. Error code 12 (Cannot allocate memory)")

CODE = f'''
import torch

ALLOC_FAIL = {ALLOC_FAIL!r}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x)


def build():
    return Net()


def build_too_big():
    raise RuntimeError(ALLOC_FAIL)


def mse(model, batch):
    return ((model(batch["inputs"]) - batch["targets"]) ** 2).mean()


def loss_too_big(model, batch):
    raise RuntimeError(ALLOC_FAIL)


def loss_bug(model, batch):
    raise RuntimeError("a bug in the loss")
'''


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "user.py").write_text(CODE)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    save_file({f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    save_file({"inputs": torch.randn(8, 8, generator=g), "targets": torch.randn(8, 4, generator=g)},
              str(tmp_path / "calib.safetensors"))
    return tmp_path


@pytest.mark.parametrize(("model", "loss", "code", "words"), [
    ("build_too_big", "mse", ExitCode.RESOURCES, ("out of memory (host)",)),
    ("build", "loss_too_big", ExitCode.RESOURCES, ("out of memory (host)",)),
    ("build", "loss_bug", ExitCode.DATA, ("a bug in the loss",)),  # other failures keep their exit code
])
def test_cpu_allocator_failure_in_user_code_is_exit_6(capsys: pytest.CaptureFixture[str], work: Path,
                                                       model: str, loss: str, code: int, words: tuple[str, ...]) -> None:
    user = work / "user.py"
    argv = [str(work / "net.safetensors"), "--model", f"{user}:{model}", "--calib", str(work / "calib.safetensors"),
            "--loss", f"{user}:{loss}", "--precision", "fp32", "--steps", "1", "--samples", "2", "-q"]
    got = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert got == code, err
    assert out == "" and len(lines) == 1 and lines[0].startswith("hallway-audit: error:") and "Traceback" not in err
    assert all(word in lines[0] for word in words), lines[0]
