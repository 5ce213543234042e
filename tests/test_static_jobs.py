"""--jobs: the static audit split across processes gives exactly the one-process result.

Worker runs use run_parallel(parent_measures=False), so every task is measured by a
worker process and merged by the parent (with the parent measuring too, a tiny
checkpoint is done before a worker has imported torch). The CLI runs set
HALLWAY_AUDIT_PARALLEL_FROM_MB=0 so a test-sized checkpoint takes the parallel path.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import write_safetensors

from hallway_audit.checkpoint import open_checkpoint
from hallway_audit.cli import main
from hallway_audit.errors import CheckpointError, ResourceError
from hallway_audit.static import StaticResult, audit_tensors, audit_units, merge_partials, plan_static, run_static
from hallway_audit.static.parallel import PARALLEL_FROM_ENV, WorkerStats, make_tasks, run_parallel
from hallway_audit.static.partial import StaticPartial, dumps_plain, loads_plain

LR = 1e-4


def state_of(r: StaticResult) -> tuple:
    """Everything a StaticResult holds, exactly (float sums and whole histograms included)."""

    def fmt(f):
        return (f.n, f.nonzero, f.signal_sq, f.error_sq, f.saturated, f.flushed, f.movable, f.ulp_rel_hist.tolist())

    def tally(t):
        return (t.params, t.nonfinite, t.zeros, {k: fmt(v) for k, v in t.formats.items()})

    layers = [(layer.name, layer.tensors, tally(layer.tally), layer.spectral) for layer in r.layers]
    return (r.formats, r.lr, r.spectral, r.bytes_read, r.skipped, tally(r.model), layers)


def model_state(seed: int = 0, blocks: int = 12) -> dict[str, torch.Tensor]:
    """Transformer-shaped, every stored dtype, small tensors (batched) between large ones
    (measured alone), a non-float tensor (skipped) and a NaN."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {"embed.weight": torch.randn(600, 48, generator=g) * 0.02}
    state["embed.weight"][3, 7] = float("nan")
    for i in range(blocks):
        state[f"blocks.{i}.attn.weight"] = torch.randn(48, 48, generator=g) * 0.02
        state[f"blocks.{i}.attn.bias"] = torch.randn(48, generator=g) * 0.02
        state[f"blocks.{i}.mlp.weight"] = (torch.randn(160, 48, generator=g) * 0.02).to(torch.bfloat16)
        state[f"blocks.{i}.norm.weight"] = torch.ones(48) + torch.randn(48, generator=g) * 0.01
        state[f"blocks.{i}.step"] = torch.tensor([i])
    state["head.weight"] = (torch.randn(64, 48, generator=g) * 0.02).to(torch.float16)
    state["head.scale"] = (torch.randn(64, generator=g)).to(torch.float8_e4m3fn)
    return state


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int) -> Path:
    """A folder with `shards` safetensors files and model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, {n: state[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_sharded(tmp_path / "sharded", model_state(), shards=4)


def in_workers(path: Path, formats: list[str], spectral: bool = False, jobs: int = 2,
               progress=None) -> tuple[StaticResult, list[WorkerStats]]:
    stats: list[WorkerStats] = []
    with open_checkpoint(path) as ckpt:
        plan = plan_static(ckpt.infos(), formats, spectral=spectral)
        result = run_parallel(ckpt, plan, LR, jobs=jobs, parent_measures=False, stats=stats.extend, progress=progress)
        assert sum(s.tasks for s in stats) == len(make_tasks(plan, jobs))  # every task was a worker's
    return result, stats


def in_one_process(path: Path, formats: list[str], spectral: bool = False) -> StaticResult:
    with open_checkpoint(path) as ckpt:
        return run_static(ckpt, formats, LR, spectral=spectral, jobs=1)


# (checkpoint, formats, --spectral, workers): each worker imports torch (seconds), so two only once
CASES = [
    ("sharded", ["bf16", "fp8_e4m3", "fp4_e2m1"], True, 2),  # plain formats: small tensors batched
    ("sharded", ["int8", "nf4", "mxfp4"], False, 1),  # scaled formats: every tensor alone
    ("single", ["bf16", "fp16", "fp8_e5m2", "int4"], False, 1),
    ("hf", ["bf16", "fp8_e4m3"], True, 1),
]


@pytest.mark.parametrize(("kind", "formats", "spectral", "jobs"), CASES)
def test_workers_give_the_one_process_result(tmp_path, sharded, ckpt_hf_llama_dir, kind, formats, spectral, jobs):
    if kind == "single":
        path = write_safetensors(tmp_path / "model.safetensors", model_state(seed=1))
    else:
        path = sharded if kind == "sharded" else ckpt_hf_llama_dir[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers run on one thread each: figures must not depend on it
    try:
        one = in_one_process(path, formats, spectral)
        split, stats = in_workers(path, formats, spectral, jobs=jobs)
    finally:
        torch.set_num_threads(threads)
    assert 1 <= len(stats) <= jobs
    assert state_of(split) == state_of(one)
    assert one.model.nonfinite == (1 if kind != "hf" else 0)


def test_the_cli_report_is_the_same_for_any_jobs(sharded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PARALLEL_FROM_ENV, "0")
    codes, reports = [], []
    for jobs in (1, 2, 3):
        out = tmp_path / f"report-{jobs}.json"
        codes.append(main([str(sharded), "--jobs", str(jobs), "--precision", "bf16,fp8_e4m3,int8", "--spectral",
                           "--format", "json", "-o", str(out), "-q"]))
        reports.append(out.read_bytes())
    assert codes == [1, 1, 1]  # the NaN fails the gate, whatever the split
    assert reports[1] == reports[0] and reports[2] == reports[0]


def test_jobs_is_validated_in_one_line(sharded, capsys, tmp_path):
    for bad in ("0", "2000", "x"):
        assert main([str(sharded), "--jobs", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--jobs" in err
    plan = tmp_path / "plan.yaml"
    plan.write_text("jobs: 1.5\n")
    assert main([str(sharded), "--plan", str(plan)]) == 2
    assert "plan.yaml: jobs: expected an integer from 1 to 1024" in capsys.readouterr().err


def test_split_audit_by_shard_merges_to_the_one_process_result(sharded):
    """What torchrun ranks do: each audits a share, the partials travel as plain data, one merges."""
    one = in_one_process(sharded, ["bf16", "fp8_e4m3"], spectral=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    parts = [audit_tensors(sharded, [n for n, f in index.items() if f == shard], ["bf16", "fp8_e4m3"], LR, spectral=True)
             for shard in shards]
    received = [StaticPartial.from_plain(loads_plain(dumps_plain(parts[1].to_plain())))]
    received += [StaticPartial.from_plain(json.loads(json.dumps(p.to_plain()))) for p in parts[2:]]
    _, _, units = parts[0].to_plain()
    assert any(f[8][0] is not None for _, tallies, _ in units for _, t in tallies for f in t[3])  # dense histograms too
    assert state_of(merge_partials([parts[0], *received])) == state_of(one)
    with open_checkpoint(sharded) as ckpt:
        plan = plan_static(ckpt.infos(), ["bf16", "fp8_e4m3"], spectral=True)
        shares = [audit_units(ckpt, plan, share, LR) for share in plan.shares(3)]
    assert state_of(merge_partials(shares)) == state_of(one)
    with pytest.raises(ValueError, match="in no partial"):
        merge_partials(shares[:2])
    with pytest.raises(ValueError, match="in two partials"):
        merge_partials([*shares, shares[0]])
    with pytest.raises(ValueError, match="another plan"):
        merge_partials([*shares, audit_tensors(sharded, [], ["bf16"], LR)])
    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        loads_plain(pickle.dumps(Path("x")))


def test_a_refusal_mid_way_is_the_one_one_process_gives(tmp_path, monkeypatch, capsys):
    """Two tensors too large to measure in 10 MB, in different tasks: the first in checkpoint
    order is the error, from a worker as from one process; the CLI line and code are the same."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model_state().items():
        state[name] = tensor
        if name == "blocks.4.norm.weight":
            state["blocks.4.big.weight"] = torch.randn(1024, 1100, generator=g)
        if name == "blocks.9.norm.weight":
            state["blocks.9.bigger.weight"] = torch.randn(1024, 1200, generator=g)
    path = write_sharded(tmp_path / "big", state, shards=6)
    monkeypatch.setenv("HALLWAY_AUDIT_MEMORY_GB", "0.01")
    with pytest.raises(ResourceError) as first:
        in_one_process(path, ["int8"])
    assert "'blocks.4.big.weight'" in first.value.message
    for _ in range(2):
        with pytest.raises(ResourceError) as split:
            in_workers(path, ["int8"])
        assert split.value.message == first.value.message
    monkeypatch.setenv(PARALLEL_FROM_ENV, "0")
    lines = []
    for jobs in ("1", "2"):
        assert main([str(path), "--precision", "int8", "--jobs", jobs, "-q"]) == 6
        lines.append(capsys.readouterr().err)
    assert lines[0] == lines[1] and lines[0].count("\n") == 1


def test_a_checkpoint_that_changed_before_the_workers_opened_it_is_refused(sharded):
    with open_checkpoint(sharded) as ckpt:
        plan = plan_static(ckpt.infos(), ["bf16"])
        shard = sorted(sharded.glob("*.safetensors"))[-1]
        with open_checkpoint(shard) as one:
            state = {i.name: one.read(i.name).clone() for i in one.infos()}
        state["head.weight"] = torch.zeros(3, 3, dtype=torch.float16)
        write_safetensors(shard, state)
        with pytest.raises(CheckpointError, match="changed while it was being audited"):
            run_parallel(ckpt, plan, LR, jobs=2, parent_measures=False)


def test_progress_adds_up_the_workers(sharded):
    calls: list[tuple[int, int, str]] = []
    in_workers(sharded, ["nf4"], jobs=1, progress=lambda done, total, name: calls.append((done, total, name)))
    total = calls[0][1]
    with open_checkpoint(sharded) as ckpt:
        assert total == ckpt.total_bytes
    assert all(t == total for _, t, _ in calls)
    dones = [d for d, _, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (total, total, "")
    assert any(0 < d < total for d in dones)


def test_a_worker_holds_about_one_tensor(tmp_path):
    """A worker's peak memory above what it holds once it has opened the checkpoint: about
    the largest tensor (read from its memory-mapped shard, measured in cache-sized
    chunks), not the 104 MB it measured. Measured: 24-34 MB here. Scaled formats (int8,
    nf4, mx*) add about five float32 copies of the largest tensor, as in one process."""
    g = torch.Generator().manual_seed(0)
    largest = torch.randn(2048, 1024, generator=g)  # 8 MB
    state = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(24)}
    state["layers.12.weight"] = largest
    path = write_sharded(tmp_path / "ckpt", state, shards=12)
    _, stats = in_workers(path, ["bf16", "fp8_e4m3"], jobs=1)
    assert stats and stats[0].bytes > 12 * largest.nbytes
    for s in stats:
        assert s.peak_rss - s.start_rss < 8 * largest.nbytes, (s, largest.nbytes)


# --- signals and killed workers, through the real CLI -----------------------------------------------


def _ask(process: psutil.Process, what: str, default: object) -> object:
    try:
        return getattr(process, what)()
    except psutil.Error:
        return default


def _workers_of(pid: int) -> list[psutil.Process]:
    kids = _ask(psutil.Process(pid), "children", [])
    return [p for p in kids if "hallway_audit.static.worker" in " ".join(_ask(p, "cmdline", []))]


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and _ask(psutil.Process(pid), "status", psutil.STATUS_ZOMBIE) != psutil.STATUS_ZOMBIE


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _slow_checkpoint(tmp_path: Path) -> Path:
    """40 MB of float32: nf4 takes one process a few seconds."""
    g = torch.Generator().manual_seed(0)
    return write_sharded(tmp_path / "slow", {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g)
                                            for i in range(10)}, shards=5)


SIGNAL_CASES = {
    "sigterm-parent": (143, "terminated (SIGTERM)"),
    "ctrl-c": (130, "interrupted"),  # SIGINT to the terminal's process group
    "sigkill-parent": (-signal.SIGKILL, None),
    "sigkill-worker": (6, "killed by SIGKILL"),  # what the out-of-memory killer does
}


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc (Linux)")
@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signals_and_killed_workers_leave_no_worker_behind(tmp_path, case):
    path = _slow_checkpoint(tmp_path)
    env = {**os.environ, PARALLEL_FROM_ENV: "0", "PYTHONWARNINGS": "ignore"}
    env.pop("HALLWAY_AUDIT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hallway_audit", str(path), "--precision", "nf4", "--jobs", "3", "--format", "json",
         "-o", str(tmp_path / "report.json"), "-q"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: a Ctrl-C here reaches it, not pytest
    )
    try:
        deadline = time.monotonic() + 60
        while len(workers := _workers_of(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(workers) == 2, "the audit ended before its workers started"
        pids = [w.pid for w in workers]
        # Mid-measurement, not at its first instant: CPython 3.11 turns a SIGINT that lands
        # inside an eval() (a namedtuple built by a lazy import) into a death by SIGINT at exit
        # under `python -m`, whatever the code catching the KeyboardInterrupt does.
        time.sleep(0.5)
        if case == "sigterm-parent":
            os.kill(proc.pid, signal.SIGTERM)
        elif case == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        elif case == "sigkill-parent":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.kill(pids[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code, needle = SIGNAL_CASES[case]
    assert proc.returncode == code, err
    if needle is not None:
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
        assert out == ""
    assert _gone(pids), "a worker outlived the audit"
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc maps (Linux)")
def test_a_worker_killed_mid_measurement_is_exit_6_naming_its_tensors(tmp_path):
    path = _slow_checkpoint(tmp_path)
    script = (
        "import sys\n"
        "from hallway_audit.checkpoint import open_checkpoint\n"
        "from hallway_audit.errors import HallwayError\n"
        "from hallway_audit.static import plan_static\n"
        "from hallway_audit.static.parallel import run_parallel\n"
        "with open_checkpoint(sys.argv[1]) as ck:\n"
        "    try:\n"
        "        run_parallel(ck, plan_static(ck.infos(), ['nf4']), 1e-4, jobs=1, parent_measures=False)\n"
        "    except HallwayError as exc:\n"
        "        print(int(exc.exit_code), exc.message)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline, victim = time.monotonic() + 60, None
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            for w in _workers_of(proc.pid):  # measuring: it has mapped a shard
                if any(m.path.endswith(".safetensors") for m in _ask(w, "memory_maps", [])):
                    victim = w
            time.sleep(0.01)
        assert victim is not None, "the worker never started measuring"
        victim.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.startswith(f"6 out of memory (host): static audit worker (pid {victim.pid}) was killed by SIGKILL"), (out, err)
    assert "while measuring tensor" in out and "layers." in out
    assert err == ""
