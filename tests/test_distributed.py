"""Sweeps across torchrun ranks (hallway_audit.distributed).

In process: the environment torchrun sets is read and refused when malformed; the
assignment of settings to ranks depends on ids and costs only; a SettingResult
survives the JSON transport exactly; a setting's numbers do not depend on which
other settings ran before it in the same process (what makes any split of the
sweep give the same report).

End to end (subprocesses, marked slow): the JSON report of a 2-process gloo run on
CPU equals the single-process report byte for byte -- the document holds no timing,
pid or host field (SettingResult.seconds and DynamicResult.seconds are not written),
so nothing is excluded from the comparison; a failure on one rank ends both ranks
with the same exit code and one error line naming the rank; a rank that stops
making progress ends the run (exit 9) instead of hanging it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLE, tiny_llama_model
from hypothesis import given, settings
from hypothesis import strategies as st

from hallway_audit.cli import main
from hallway_audit.distributed import codec
from hallway_audit.distributed.assign import assign
from hallway_audit.distributed.env import DEFAULT_TIMEOUT_S, rank_env
from hallway_audit.errors import ExitCode, UsageError
from hallway_audit.model.losses import causal_lm
from hallway_audit.probe import BurstOptions, OptimizerSpec, PrecisionStack, Setting, Subspace, run_sweep
from hallway_audit.probe.horizon import Schedule
from hallway_audit.probe.result import StepRecord
from hallway_audit.report.schema import _setting_dict

ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# ----------------------------------------------------------------------------- the environment


def test_single_process_when_world_size_is_absent_or_one():
    assert rank_env({}) is None
    assert rank_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = rank_env(ENV)
    assert env is not None and (env.rank, env.local_rank, env.world_size, env.master_port) == (1, 1, 2, 29500)
    assert env.timeout_s == DEFAULT_TIMEOUT_S and not env.is_root
    assert rank_env({**ENV, "HALLWAY_AUDIT_DIST_TIMEOUT": "2.5"}).timeout_s == 2.5  # type: ignore[union-attr]


@pytest.mark.parametrize(("change", "needle"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"RANK": "2"}, "RANK='2' must be 0 to 1"),
    ({"RANK": ""}, "RANK is not set"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be 0 to 1"),
    ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' must be 1 to 65535"),
    ({"HALLWAY_AUDIT_DIST_TIMEOUT": "nan"}, "must be a positive number of seconds"),
    ({"HALLWAY_AUDIT_DIST_TIMEOUT": "0"}, "must be a positive number of seconds"),
    ({"HALLWAY_AUDIT_DIST_TIMEOUT": "soon"}, "is not a number of seconds"),
])
def test_a_malformed_environment_is_a_usage_error(change, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        rank_env({**ENV, **change})


def test_the_cli_refuses_a_malformed_environment_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    code = main([str(EXAMPLE), "-q"])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert err.strip().splitlines() == ["hallway-audit: error: RANK='x' is not a whole number"]


# ----------------------------------------------------------------------------- the assignment


def test_every_setting_goes_to_exactly_one_rank_whatever_the_order():
    ids = [f"s{i}" for i in range(7)]
    costs = [5, 1, 9, 3, 3, 7, 2]
    shares = assign(ids, costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(7))
    by_id = [{ids[i] for i in s} for s in shares]
    order = [6, 2, 0, 4, 1, 5, 3]  # the same settings listed in another order
    again = assign([ids[i] for i in order], [costs[i] for i in order], 3)
    assert [{ids[order[i]] for i in s} for s in again] == by_id
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)  # longest first onto the least loaded rank
    assert assign(ids, costs, 1) == [list(range(7))]
    assert assign(["a"], [4], 3) == [[0], [], []]  # more ranks than settings: the rest idle


# ----------------------------------------------------------------------------- the transport


def _batch():
    ids = torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


SETTINGS = [
    Setting(PrecisionStack("bf16"), Subspace("lora", 2, "all-linear"), OptimizerSpec("adamw", 1e-3)),
    Setting(PrecisionStack("fp8_e4m3", None, "stochastic", "none"), Subspace("full"), OptimizerSpec("sgd", 1e-2)),
    Setting(PrecisionStack("bf16"), Subspace("sparse", sparsity=0.5), OptimizerSpec("adamw", 1e-3)),
    Setting(PrecisionStack("fp8_e4m3"), Subspace("lora", 4, "attention"), OptimizerSpec("adamw", 1e-3)),
]


def _sweep(settings, loss=causal_lm, **options):
    batch = _batch()
    train = {k: v[:8] for k, v in batch.items()}
    val = {k: v[8:] for k, v in batch.items()}
    opts = BurstOptions(**{"steps": 2, "samples": 8, "micro_batch": 4, "early_stop": False,
                           "schedule": Schedule("cosine", 50, 5, 1e-5), **options})
    return run_sweep(tiny_llama_model(), settings=settings, loss_fn=loss, loss_name="t", train=train, val=val,
                     options=opts, model_source="t", calib="t", val_source="t").settings


@pytest.fixture(scope="module")
def results():
    # the last setting also with --per-layer-p (LoRA on attention: few layers, quick)
    return _sweep(SETTINGS) + _sweep(SETTINGS[3:], per_layer_p=True, samples=4)


def _text(value) -> str:
    return codec.dumps(codec.to_plain(value)).decode()


def test_a_setting_result_survives_the_transport_exactly(results):
    for r in results:
        raw = codec.dumps(codec.to_plain(r))
        back = codec.from_plain(codec.loads(raw))
        assert _text(back) == raw.decode()  # every field, with its type (tuples, int keys, tensors)
        assert type(back.setting.optimizer.betas) is tuple and type(back.layers) is dict
        for name, layer in r.layers.items():
            assert torch.equal(back.layers[name].hist, layer.hist) and back.layers[name].hist.dtype == layer.hist.dtype
            assert back.layers[name].psi_star == layer.psi_star
        # the report reads it back the same
        assert json.dumps(_setting_dict(back), sort_keys=True) == json.dumps(_setting_dict(r), sort_keys=True)
    assert any(r.pt and r.pt[0].realized_layer for r in results)  # --per-layer-p rates travelled
    assert any(r.forecast is not None for r in results) and any(r.shadow is not None for r in results)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.none(), min_size=10, max_size=10))
def test_floats_travel_bit_for_bit(values):
    loss = values[1] if values[1] is not None else 0.0
    step = StepRecord(0, loss, *values[2:9], update_norm=values[0] if values[0] is not None else -0.0)
    back = codec._decode(codec.loads(codec.dumps(codec._encode(step))))
    for a, b in zip(vars(step).values(), vars(back).values(), strict=True):
        assert type(a) is type(b)
        if isinstance(a, float):
            assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
        else:
            assert a == b


@pytest.mark.parametrize("payload", [
    {"@": "dc", "c": "subprocess.Popen", "f": {}},  # only the result's own dataclasses are built
    {"@": "dc", "c": "hallway_audit.probe.horizon.Schedule", "f": {"kind": "constant"}},  # fields must match
    {"@": "tensor", "dtype": "Tensor", "shape": [1], "v": [0]},
    {"@": "pickle", "v": "gASVAAAAAAAAAA=="},
])
def test_the_transport_builds_nothing_but_plain_results(payload):
    with pytest.raises(ValueError):
        codec._decode(payload)
    with pytest.raises(ValueError):
        codec.from_plain({"@": "tuple", "v": []})
    with pytest.raises(TypeError):
        codec.to_plain(object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- layout independence


def _coupled_before_the_mlp(module, batch):
    """Causal LM loss plus a term coupling the examples through layer 0's q_proj output:
    LoRA adapters on attention see the coupling (shares disagree with the direct
    gradient), adapters on the MLPs do not (nothing of them reaches that output)."""
    seen = {}
    hook = module.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    try:
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    finally:
        hook.remove()
    per_example = seen["q"].mean(dim=(1, 2))
    return out.loss + 10.0 * (per_example - per_example.mean()).square().mean()


ATTENTION = Setting(PrecisionStack("bf16"), Subspace("lora", 2, "attention"), OptimizerSpec("adamw", 1e-3))
MLP = Setting(PrecisionStack("bf16"), Subspace("lora", 2, "mlp"), OptimizerSpec("adamw", 1e-3))


def test_a_setting_gives_the_same_numbers_whichever_settings_ran_before_it():
    """Each setting decides for itself whether the loss splits by example: the MLP setting
    measures the same alone as after the attention setting that found the loss coupled
    (one verdict shared by the sweep, as before, would have skipped its shares)."""
    together = _sweep([ATTENTION, MLP], loss=_coupled_before_the_mlp)
    alone = _sweep([MLP], loss=_coupled_before_the_mlp)
    assert [s.g_b for s in together[0].pt] == ["direct", "direct"]  # the coupling was found
    assert [s.g_b for s in alone[0].pt] == ["example shares", "example shares"]
    assert _text(replace(together[1], seconds=0.0)) == _text(replace(alone[0], seconds=0.0))
    # the premise: a verdict carried over from the attention setting changes the MLP setting's figures
    from hallway_audit.probe.burst import run_burst
    from hallway_audit.probe.shares import SharesVerdict
    from hallway_audit.probe.targets import param_dict, parameter_universe

    model, batch = tiny_llama_model(), _batch()
    train, val = {k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}
    opts = BurstOptions(steps=2, samples=8, micro_batch=4, early_stop=False, schedule=Schedule("cosine", 50, 5, 1e-5))
    args = (model, _coupled_before_the_mlp, "t", parameter_universe(model), param_dict(model), train, val, opts)
    shared = SharesVerdict()
    run_burst(ATTENTION, *args, None, shared)
    carried = run_burst(MLP, *args, None, shared)
    assert [s.g_b for s in carried.pt] == ["direct", "direct"]
    assert _text(replace(carried, seconds=0.0)) != _text(replace(alone[0], seconds=0.0))


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "HALLWAY_AUDIT_DEBUG")}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


SWEEP = ["--calib", str(EXAMPLE / "calib.safetensors"), "--steps", "2", "--samples", "16", "--micro-batch", "4", "-q"]

LOSS = '''
import os
import time

calls = 0


def loss(model, batch):
    """The example's causal LM loss; on rank FAIL_RANK, NaN (DataError, exit 8) or a long
    sleep (no progress) once it has been called FAIL_AFTER times."""
    global calls
    calls += 1
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    if os.environ.get("RANK") == os.environ["FAIL_RANK"] and calls > int(os.environ["FAIL_AFTER"]):
        if os.environ.get("SLEEP_S"):
            time.sleep(float(os.environ["SLEEP_S"]))
        else:
            return out * float("nan")
    return out
'''


def _torchrun(args: list[str], *, timeout: float, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "hallway_audit", *args]
    return subprocess.run(cmd, check=False, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_write_the_single_process_report():
    args = [str(EXAMPLE), *SWEEP, "--rank", "4,8", "--precision", "bf16,fp8_e4m3", "--format", "json"]
    single = subprocess.run([sys.executable, "-m", "hallway_audit", *args], check=False, env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode in (0, 1), single.stderr
    ranked = _torchrun(args, timeout=300)
    assert ranked.returncode == single.returncode, ranked.stderr[-2000:]
    doc = json.loads(ranked.stdout)  # one document on stdout: rank 1 printed nothing
    assert len(doc["settings"]) == 4
    assert doc == json.loads(single.stdout)
    assert ranked.stdout == single.stdout  # and byte for byte
    assert "Traceback" not in ranked.stderr
    assert [line for line in ranked.stderr.splitlines() if line.startswith("hallway-audit:")] == []


def _launch(args: list[str], tmp_path: Path, **env: str) -> list[subprocess.Popen]:
    """Two ranks started by hand, as a launcher would: each one's exit code and stderr apart."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        rank_env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "hallway_audit", *args], env=rank_env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize(("fail_rank", "fail_after", "needle"), [
    ("1", "3", "rank 1: loss is nan at the start"),  # rank 1 fails in its first burst
    ("0", "0", "rank 0: loss '"),  # rank 0 fails checking the loss, while rank 1 probes: rank 1 stops
])
def test_a_failure_on_one_rank_ends_both_with_its_code(tmp_path, fail_rank, fail_after, needle):
    (tmp_path / "failing.py").write_text(LOSS)
    args = [str(EXAMPLE), *SWEEP, "--loss", "failing.py:loss", "--rank", "4", "--precision", "bf16,fp8_e4m3",
            "--format", "json", "--output", "report.json"]
    procs = _launch(args, tmp_path, FAIL_RANK=fail_rank, FAIL_AFTER=fail_after)
    try:
        outs = [(*p.communicate(timeout=240), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [code for _, _, code in outs]
    assert codes == [ExitCode.DATA, ExitCode.DATA], [err[-800:] for _, err, _ in outs]
    lines0 = [line for line in outs[0][1].splitlines() if line.strip()]
    assert len(lines0) == 1 and lines0[0].startswith("hallway-audit: error: " + needle), lines0
    assert outs[1][1].strip() == "" and outs[1][0] == ""  # the other rank prints nothing
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_a_rank_without_progress_ends_the_run_instead_of_hanging_it(tmp_path):
    (tmp_path / "failing.py").write_text(LOSS)
    args = [str(EXAMPLE), *SWEEP, "--loss", "failing.py:loss", "--rank", "4", "--precision", "bf16,fp8_e4m3"]
    procs = _launch(args, tmp_path, FAIL_RANK="1", FAIL_AFTER="3", SLEEP_S="600", HALLWAY_AUDIT_DIST_TIMEOUT="4")
    try:
        _, err0 = procs[0].communicate(timeout=240)
        assert procs[0].returncode == ExitCode.DISTRIBUTED, err0[-800:]
        assert procs[1].poll() is None  # rank 1 still sleeping in the loss: rank 0 did not wait for it
        lines = [line for line in err0.splitlines() if line.strip()]
        assert lines == ["hallway-audit: error: rank 1: no progress for 4 s while rank 0 waited for it to hand in "
                         "its results (HALLWAY_AUDIT_DIST_TIMEOUT sets the limit)"]
        procs[1].send_signal(signal.SIGTERM)  # what torchrun does to the others once one rank has exited
        procs[1].communicate(timeout=60)
        assert procs[1].returncode is not None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_a_static_audit_under_two_ranks_is_written_once_by_rank_0(tmp_path):
    args = [str(EXAMPLE), "-q", "--format", "json"]
    single = subprocess.run([sys.executable, "-m", "hallway_audit", *args], check=False, env=_env(), capture_output=True,
                            text=True, timeout=120)
    procs = _launch(args, tmp_path)
    outs = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [code for _, _, code in outs] == [single.returncode, single.returncode]
    assert outs[0][0] == single.stdout and outs[1][0] == ""
    assert outs[1][1].strip() == ""


LIBRARY = """
import json, os, sys
from hallway_audit import audit_distributed
from hallway_audit.audit import DynamicPlan
from hallway_audit.probe import BurstOptions, SweepSpec

example = sys.argv[1]


def run():
    result = audit_distributed(example, device="cpu", dynamic=DynamicPlan(
        calib=os.path.join(example, "calib.safetensors"), sweep=SweepSpec(precision=["bf16", "fp8_e4m3"], rank=[4, 8]),
        burst=BurstOptions(steps=2, samples=16, micro_batch=4)))
    return result.to_dict() if result is not None else None


docs = [run()]
if "RANK" in os.environ:  # again inside a process group of the program's own
    import torch.distributed as dist

    dist.init_process_group("gloo")
    docs.append(run())
    dist.destroy_process_group()
with open(f"out-{os.environ.get('RANK', 'single')}.json", "w") as f:
    json.dump(docs, f, sort_keys=True)
"""


@pytest.mark.slow
def test_audit_distributed_returns_the_whole_sweep_on_rank_0_and_none_elsewhere(tmp_path):
    (tmp_path / "run.py").write_text(LIBRARY)
    single = subprocess.run([sys.executable, "run.py", str(EXAMPLE)], check=False, cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "run.py", str(EXAMPLE)]
    ranked = subprocess.run(cmd, check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    docs = {name: json.loads((tmp_path / f"out-{name}.json").read_text()) for name in ("single", "0", "1")}
    assert docs["1"] == [None, None]
    assert len(docs["0"][0]["settings"]) == 4
    assert docs["0"] == [docs["single"][0], docs["single"][0]]  # in its own group and in the program's


def test_ranks_that_cannot_meet_end_with_exit_9(tmp_path):
    procs = _launch([str(EXAMPLE), "-q"], tmp_path, HALLWAY_AUDIT_DIST_TIMEOUT="2")
    procs[1].kill()  # rank 1 never shows up
    _, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[0].returncode == ExitCode.DISTRIBUTED
    assert err.strip().startswith("hallway-audit: error: rank 0: could not meet the other 1 rank(s) at 127.0.0.1:")
