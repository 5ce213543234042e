"""The dynamic audit end to end through the CLI (in-process): HF causal LMs and encoders built
locally, --model factories on plain safetensors, custom losses, sweeps from flags / plan YAML /
PEFT configs, the recommendation, reproducibility, and every input error as one line and an
exit code. Bursts are tiny (2-3 steps, 16 samples) so this file runs in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLE
from safetensors.torch import save_file

from hallway_audit.cli import main
from hallway_audit.errors import ExitCode

MODEL_KEYS = ("psi", "psi_rank", "p_t", "p_t_lo", "p_t_hi", "p_t_uniform", "p_t_val", "blocked", "beta",
              "beta_proposed", "beta_eff", "beta_eff_elem", "loss", "val_loss")
TINY = ("--steps", "2", "--samples", "16", "--micro-batch", "4", "-q")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, err = run(capsys, *argv, "--format", "json")
    assert "Traceback" not in err, err
    assert code in (ExitCode.OK, ExitCode.GATE_FAILED), err
    return code, json.loads(out)


def check_document(doc: dict, n_settings: int) -> None:
    assert len(doc["settings"]) == n_settings
    assert len({s["id"] for s in doc["settings"]}) == n_settings
    for s in doc["settings"]:
        m = s["model"]
        for key in MODEL_KEYS:
            assert key in m, key
        assert m["p_t_lo"] <= m["p_t"] <= m["p_t_hi"]
        assert m["p_t_uniform_lo"] <= m["p_t_uniform"] <= m["p_t_uniform_hi"]
        assert 0.0 <= m["psi"] <= 1.0 + 1e-9 and 0.0 <= m["psi_rank"] <= 1.0 + 1e-9
        assert 0.0 <= m["beta"] <= 1.0 and 0.0 <= m["blocked"] <= 1.0
        assert math.isfinite(m["loss"]) and math.isfinite(m["val_loss"])
        for state in s["p_t_states"]:
            assert state["p_t_lo"] <= state["p_t"] <= state["p_t_hi"]
    rec = doc["recommendation"]
    for key in ("setting", "rank_pattern", "keep_finer"):
        assert key in rec
    assert rec["setting"] is None or rec["setting"] in {s["id"] for s in doc["settings"]}


# ----------------------------------------------------------------------------- inputs built here


FACTORY = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def build():
    return Net()


def linear():
    return torch.nn.Linear(32, 24, bias=False)
'''

LOSSES = '''
import torch
import torch.nn.functional as F

_START = {}
_C = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))


def linear(model, batch):
    """Linear in the weights: dL/dW = C everywhere."""
    return (model.weight * _C).sum()


def bert_ce(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"])


def not_scalar(model, batch):
    return ((model(batch["inputs"]) - batch["targets"]) ** 2).mean(dim=1)


def nan_loss(model, batch):
    return model(batch["inputs"]).sum() * float("nan")


def nan_once_moved(model, batch):
    """Finite at the checkpoint, NaN as soon as the burst has moved the weights."""
    loss = ((model(batch["inputs"]) - batch["targets"]) ** 2).mean()
    total = float(model.net[0].weight.detach().sum())
    _START.setdefault("w", total)
    return loss if total == _START["w"] else loss * float("nan")
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dynamic")
    (root / "factory.py").write_text(FACTORY)
    (root / "losses.py").write_text(LOSSES)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    state = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    save_file(state, str(root / "net.safetensors"))
    bad_shape = dict(state, **{"net.0.weight": torch.zeros(16, 9)})
    save_file(bad_shape, str(root / "bad_shape.safetensors"))
    missing = {k: v for k, v in state.items() if k != "net.2.bias"}
    save_file(missing, str(root / "missing.safetensors"))
    save_file({"weight": torch.randn(24, 32, generator=torch.Generator().manual_seed(4)) * 0.1},
              str(root / "linear.safetensors"))
    g = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    save_file({"inputs": inputs, "targets": targets}, str(root / "calib.safetensors"))
    save_file({"inputs": inputs, "targets": targets[:15].contiguous()}, str(root / "ragged.safetensors"))
    nan_targets = targets.clone()
    nan_targets[3, 1] = float("nan")
    save_file({"inputs": inputs, "targets": nan_targets}, str(root / "nan.safetensors"))
    return root


@pytest.fixture(scope="module")
def llama_calib(tmp_path_factory) -> Path:
    """input_ids / attention_mask / labels for the conftest tiny Llama (vocab 128), with padding."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    path = tmp_path_factory.mktemp("calib") / "llama.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, str(path))
    return path


# ----------------------------------------------------------------------------- end to end


def test_hf_causal_lm_dynamic_audit_json(capsys, ckpt_hf_llama_dir, llama_calib):
    path, _ = ckpt_hf_llama_dir
    code, doc = run_json(capsys, path, "--calib", llama_calib, "--rank", "2", "--precision", "bf16", *TINY)
    check_document(doc, 1)
    assert doc["dynamic"]["loss"] == "causal_lm"
    assert doc["dynamic"]["train_examples"] + doc["dynamic"]["val_examples"] == 12
    assert doc["dynamic"]["val_examples"] == 3  # 25% held out
    (s,) = doc["settings"]
    assert s["id"] == "bf16/r2/adamw-0.0001"
    assert s["subspace"]["kind"] == "lora" and s["subspace"]["rank"] == 2
    assert len(s["steps"]) == 2
    assert {state["step"] for state in s["p_t_states"]} == {0, 2}
    assert s["model"]["psi_rank"] < 1.0
    trainable = {layer["name"] for layer in s["layers"] if layer["trainable"]}
    assert "lm_head" not in trainable and trainable
    assert all(layer["planned_rank"] == 2 for layer in s["layers"] if layer["trainable"])
    assert code == (ExitCode.OK if doc["gate"]["passed"] else ExitCode.GATE_FAILED)


def test_encoder_with_custom_loss_file(capsys, model_hf_bert, work):
    path, _ = model_hf_bert
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (12, 8), generator=g)
    calib = work / "bert_calib.safetensors"
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "labels": torch.randint(0, 3, (12,), generator=g)}, str(calib))
    spec = f"{work / 'losses.py'}:bert_ce"
    _, doc = run_json(capsys, path, "--calib", calib, "--loss", spec, "--rank", "2", "--targets", "attention",
                      "--precision", "bf16", *TINY)
    check_document(doc, 1)
    assert doc["dynamic"]["loss"] == spec
    trainable = {layer["name"] for layer in doc["settings"][0]["layers"] if layer["trainable"]}
    assert trainable == {f"bert.encoder.layer.0.attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")}


def test_factory_model_on_plain_safetensors_with_mse(capsys, work):
    _, doc = run_json(capsys, work / "net.safetensors", "--model", f"{work / 'factory.py'}:build",
                      "--calib", work / "calib.safetensors", "--precision", "fp32", "--sparsity", "0,2:4", *TINY)
    assert doc["dynamic"]["loss"] == "mse"
    ids = {s["id"] for s in doc["settings"]}
    assert ids == {"fp32/full/adamw-0.0001", "fp32/sp0.5-2:4/adamw-0.0001"}
    check_document(doc, 2)
    sparse = next(s for s in doc["settings"] if s["subspace"]["kind"] == "sparse")
    assert sparse["subspace"]["mask"] == "2:4" and sparse["subspace"]["sparsity"] == 0.5
    assert sparse["model"]["psi"] < 1.0  # the mask drops half of each target's gradient
    full = next(s for s in doc["settings"] if s["subspace"]["kind"] == "full")
    assert full["model"]["psi"] == pytest.approx(1.0, abs=1e-9)
    assert full["model"]["psi_rank"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_linear_loss_p_t_through_the_cli(capsys, work, optimizer):
    """Uniform moves on a linear loss descend with probability exactly 1/2; noiseless optimizer
    moves (sigma 0) always descend."""
    _, doc = run_json(capsys, work / "linear.safetensors", "--model", f"{work / 'factory.py'}:linear",
                      "--calib", work / "calib.safetensors", "--loss", f"{work / 'losses.py'}:linear",
                      "--precision", "fp32", "--optimizer", optimizer, "--lr", "1e-3", "--steps", "2",
                      "--samples", "100", "--sigma", "0", "--no-early-stop", "-q")
    m = doc["settings"][0]["model"]
    assert m["p_t_samples"] == 200  # two states x 100, no early stop
    assert sum(state["p_t_uniform_samples"] for state in doc["settings"][0]["p_t_states"]) == 200
    assert m["p_t_uniform_lo"] <= 0.5 <= m["p_t_uniform_hi"]
    assert m["p_t"] == 1.0 and m["p_t_lo"] > 0.5 and m["p_t_hi"] == 1.0
    assert m["blocked"] == 0.0
    assert m["psi"] == pytest.approx(1.0, abs=1e-9)


def test_rank_and_precision_lists_make_four_settings(capsys, work):
    _, doc = run_json(capsys, work / "net.safetensors", "--model", f"{work / 'factory.py'}:build",
                      "--calib", work / "calib.safetensors", "--rank", "2,4", "--precision", "bf16,fp8_e4m3",
                      "--steps", "1", "--samples", "1", "-q")
    check_document(doc, 4)
    assert {(s["precision"]["weights"], s["subspace"]["rank"]) for s in doc["settings"]} == {
        ("bf16", 2), ("bf16", 4), ("fp8_e4m3", 2), ("fp8_e4m3", 4)}
    assert doc["static"]["formats"] == ["bf16", "fp8_e4m3"]


def test_command_line_flags_override_the_plan(capsys, work, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"model: {work / 'factory.py'}:build\ncalib: {work / 'calib.safetensors'}\n"
        "precision: [fp8_e4m3]\nrank: [8, 16]\nlr: [1.0e-3]\noptimizer: sgd\nsteps: 3\nsamples: 1\nseed: 5\n"
    )
    # the plan names code (model: file.py:build): imported only with --trust-plan-code
    code, _, err = run(capsys, work / "net.safetensors", "--plan", plan, "-q")
    assert code == ExitCode.USAGE and "--trust-plan-code" in err and "model" in err
    _, doc = run_json(capsys, work / "net.safetensors", "--plan", plan, "--trust-plan-code", "--rank", "4", "--steps",
                      "1", "-q")
    (s,) = doc["settings"]
    assert s["subspace"]["rank"] == 4  # the flag wins over the plan's [8, 16]
    assert s["precision"]["weights"] == "fp8_e4m3"  # from the plan
    assert s["optimizer"]["kind"] == "sgd" and s["optimizer"]["lr"] == 1e-3
    assert doc["dynamic"]["steps"] == 1  # flag
    assert doc["dynamic"]["samples"] == 1 and doc["dynamic"]["seed"] == 5  # plan
    assert len(s["steps"]) == 1


def test_peft_adapter_config_sets_the_subspace(capsys, work, tmp_path):
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["0"], "lora_alpha": 8,
                               "use_rslora": True, "rank_pattern": {"net.0": 4}}))
    args = (work / "net.safetensors", "--model", f"{work / 'factory.py'}:build", "--calib",
            work / "calib.safetensors", "--peft-config", cfg, "--precision", "fp32", "--steps", "1", "--samples", "1", "-q")
    _, doc = run_json(capsys, *args)
    (s,) = doc["settings"]
    sub = s["subspace"]
    assert (sub["kind"], sub["rank"], sub["alpha"], sub["rslora"]) == ("lora", 2, 8.0, True)
    assert sub["rank_pattern"] == {"net.0": 4}
    layers = {layer["name"]: layer for layer in s["layers"]}
    assert layers["net.0"]["trainable"] and layers["net.0"]["planned_rank"] == 4
    assert not layers["net.2"]["trainable"]
    _, doc = run_json(capsys, *args, "--rank", "3")  # a flag overrides the PEFT config's r
    assert doc["settings"][0]["subspace"]["rank"] == 3


# ----------------------------------------------------------------------------- reproducibility and the recommendation


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory) -> tuple[list[str], list[dict]]:
    """The bundled example probed twice with the same command (ranks 2 and 32, and full fine-tuning)."""
    out = tmp_path_factory.mktemp("example")
    texts = []
    for i in range(2):
        target = out / f"run{i}.json"
        code = main([str(EXAMPLE), "--calib", str(EXAMPLE / "calib.safetensors"), "--rank", "2,32,full",
                     "--precision", "fp32", "--steps", "2", "--samples", "16", "-q", "--format", "json", "-o", str(target)])
        assert code in (ExitCode.OK, ExitCode.GATE_FAILED)
        texts.append(target.read_text())
    return texts, [json.loads(t) for t in texts]


def test_same_command_gives_identical_json(example_runs):
    texts, docs = example_runs
    assert texts[0] == texts[1]
    check_document(docs[0], 3)


def test_recommendation_is_the_cheapest_near_the_best_score(example_runs):
    _, (doc, _) = example_runs
    settings = {s["id"]: s for s in doc["settings"]}
    errors = dict.fromkeys(settings, 0)
    global_errors = 0
    for f in doc["findings"]:
        if f["severity"] == "error":
            if f.get("setting") in errors:
                errors[f["setting"]] += 1
            elif f.get("setting") is None:
                global_errors += 1
    assert global_errors == 0  # a healthy fp32 checkpoint
    # full fine-tuning in fp32 captures the whole gradient (psi_rank = 1) and moves every weight:
    # it cannot fire an error rule, so something always passes
    full = next(sid for sid, s in settings.items() if s["subspace"]["kind"] == "full")
    assert settings[full]["model"]["psi_rank"] == pytest.approx(1.0, abs=1e-9)
    assert errors[full] == 0

    def rank(sid):
        s = settings[sid]["subspace"]
        return s["rank"] if s["kind"] == "lora" else math.inf

    passing = [sid for sid, n in errors.items() if n == 0]
    rec = doc["recommendation"]
    assert rec["setting"] in passing
    # the cheapest setting whose score is within 10% of the best passing score
    score = {sid: settings[sid]["model"]["score"] for sid in passing}
    near = [sid for sid in passing if score[sid] >= 0.9 * max(score.values())]
    assert rec["setting"] in near
    assert rank(rec["setting"]) == min(rank(sid) for sid in near)
    # the LoraConfig belongs to the recommended setting: its rank, alpha, rsLoRA and targets
    chosen = settings[rec["setting"]]
    if chosen["subspace"]["kind"] != "lora":
        assert rec["lora_config"] is None and rec["base_rank"] is None
        return
    assert rec["lora_config"]["r"] == rec["base_rank"] == chosen["subspace"]["rank"]
    # rank_pattern (advice, not in the config): the recommended setting's escaping layers,
    # r_star rounded up to a power of two
    escaping = {f["layer"] for f in doc["findings"]
                if f["rule"] == "gradient-escapes-rank" and f["setting"] == rec["setting"]}
    layers = {layer["name"]: layer for layer in chosen["layers"]}
    assert set(rec["rank_pattern"]) <= escaping
    assert "rank_pattern" not in rec["lora_config"]
    for layer, r in rec["rank_pattern"].items():
        assert r & (r - 1) == 0 and r >= 1  # a power of two
        assert r >= rec["base_rank"]
        assert r > layers[layer]["planned_rank"]
        assert r >= layers[layer]["r_star"] > r // 2


# ----------------------------------------------------------------------------- errors: one line, an exit code


def assert_one_line_error(code: int, out: str, err: str, expected: int, *words: str) -> None:
    assert code == expected, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hallway-audit: error:")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""


@pytest.mark.parametrize(
    "ckpt, calib, loss, expected, words",
    [
        ("bad_shape.safetensors", "calib.safetensors", None, ExitCode.MODEL, ("net.0.weight", "(16, 9)")),
        ("missing.safetensors", "calib.safetensors", None, ExitCode.MODEL, ("missing", "net.2.bias")),
        ("net.safetensors", "calib.safetensors", "not_scalar", ExitCode.DATA, ("not a scalar",)),
        ("net.safetensors", "calib.safetensors", "nan_loss", ExitCode.DATA, ("NaN",)),
        ("net.safetensors", "nan.safetensors", None, ExitCode.DATA, ("targets", "NaN")),
        ("net.safetensors", "ragged.safetensors", None, ExitCode.DATA, ("leading dimension",)),
        ("net.safetensors", "calib.safetensors", "nan_once_moved", ExitCode.DATA, ("nan", "step")),
    ],
)
def test_model_and_data_errors(capsys, work, ckpt, calib, loss, expected, words):
    argv = [work / ckpt, "--model", f"{work / 'factory.py'}:build", "--calib", work / calib, "--precision", "fp32",
            "--steps", "2", "--samples", "2", "-q"]
    if loss:
        argv += ["--loss", f"{work / 'losses.py'}:{loss}"]
    assert_one_line_error(*run(capsys, *argv), expected, *words)


def test_usage_errors(capsys, work, tmp_path):
    net, calib, factory = work / "net.safetensors", work / "calib.safetensors", f"{work / 'factory.py'}:build"
    bad_plan = tmp_path / "plan.yaml"
    bad_plan.write_text("rank: [4, 8\nprecision: bf16\n")
    cases = [
        ((net, "--calib", calib), ("architecture",)),  # plain safetensors, no --model
        ((net, "--model", factory, "--calib", calib, "--rounding", "floor"), ("rounding", "floor")),
        ((net, "--model", factory, "--calib", calib, "--rank", "4", "--sparsity", "0.5"), ("--sparsity",)),
        ((net, "--model", factory), ("--calib",)),
        ((net, "--plan", bad_plan), ("plan.yaml", "malformed")),
        ((net, "--model", factory, "--calib", calib, "--rank", "2", "--targets", "nothing_here"), ("nothing_here",)),
        ((net, "--model", factory, "--calib", calib, "--loss", "no_such_loss"), ("no_such_loss",)),
    ]
    for argv, words in cases:
        assert_one_line_error(*run(capsys, *argv, "-q"), ExitCode.USAGE, *words)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(capsys, ckpt_hf_llama_dir, llama_calib):
    path, _ = ckpt_hf_llama_dir
    docs = {}
    for device in ("cpu", "cuda"):
        _, doc = run_json(capsys, path, "--calib", llama_calib, "--rank", "2", "--precision", "bf16",
                          "--device", device, *TINY)
        assert doc["dynamic"]["device"].startswith(device)
        docs[device] = doc
    cpu, gpu = docs["cpu"]["settings"][0]["model"], docs["cuda"]["settings"][0]["model"]
    assert gpu["psi_rank"] == pytest.approx(cpu["psi_rank"], abs=1e-3)
    assert gpu["p_t_lo"] <= gpu["p_t"] <= gpu["p_t_hi"]
