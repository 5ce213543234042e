"""Calibration batches that belong to the user: any named tensors with a user loss or a
--model factory (sentence-transformers pairs with an in-batch contrastive loss, a model
whose forward takes `features` and `mask`), checked before any expensive work; headless
transformers models; the p_t slow path named; layers a loss never reaches.

Models are built here from local configs (a BertModel the shape of a tiny sentence
embedder); bursts are 1-2 steps with a handful of samples so the file runs in seconds.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hallway_audit import BurstOptions, DynamicPlan, SweepSpec, audit
from hallway_audit.cli import main
from hallway_audit.errors import DataError, ExitCode, UsageError
from hallway_audit.model import (
    MicroBatches,
    build_model,
    load_calibration,
    model_inputs,
    resolve_loss,
    split_batch,
    token_count,
    verify_loss,
)
from hallway_audit.probe import run_sweep
from hallway_audit.probe.engine import LossEvaluator
from hallway_audit.probe.settings import OptimizerSpec, PrecisionStack, Setting, Subspace
from hallway_audit.probe.shares import COUPLED, NOT_LORA, ExampleShares

VOCAB = 100

CONTRASTIVE = '''
import torch
import torch.nn.functional as F


def embed(model, ids, mask):
    """Mean pooling of the last hidden state over real tokens, normalized (sentence-transformers)."""
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def contrastive(model, batch):
    """In-batch negatives (MultipleNegativesRankingLoss): each a_i against every b_j."""
    a = embed(model, batch["a_input_ids"], batch["a_attention_mask"])
    b = embed(model, batch["b_input_ids"], batch["b_attention_mask"])
    scores = a @ b.T / 0.05
    return F.cross_entropy(scores, torch.arange(scores.shape[0], device=scores.device))


def cosine(model, batch):
    """Per-pair cosine loss: a mean of per-example terms (no coupling between pairs)."""
    a = embed(model, batch["a_input_ids"], batch["a_attention_mask"])
    b = embed(model, batch["b_input_ids"], batch["b_attention_mask"])
    return (1 - (a * b).sum(-1)).mean()
'''


def _side(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids * mask, mask


def pairs(n: int = 16, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, am = _side(n, length, g)
    b, bm = _side(n, length, g)
    return {"a_input_ids": a, "a_attention_mask": am, "b_input_ids": b, "b_attention_mask": bm}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertModel (no head: it returns hidden states) saved as a Hugging Face directory."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BertModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pairs.safetensors and loss.py (contrastive, cosine) in one directory."""
    root = tmp_path_factory.mktemp("pairs")
    save_file(pairs(), str(root / "pairs.safetensors"))
    (root / "loss.py").write_text(CONTRASTIVE, encoding="utf-8")
    return root


# -- through the CLI ---------------------------------------------------------------


def test_pairs_with_an_in_batch_contrastive_loss_through_the_cli(bert_dir, pair_files, capsys, monkeypatch):
    monkeypatch.chdir(pair_files)
    out = pair_files / "out.json"
    code = main([str(bert_dir), "--calib", "pairs.safetensors", "--loss", "loss.py:contrastive", "--rank", "4",
                 "--precision", "bf16", "--steps", "2", "--samples", "8", "--format", "json", "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code in (ExitCode.OK, ExitCode.GATE_FAILED), err
    doc = json.loads(out.read_text())
    dyn = doc["dynamic"]
    assert dyn["loss"] == "loss.py:contrastive" and (dyn["train_examples"], dyn["val_examples"]) == (12, 4)
    train, _ = split_batch(pairs(), 0.25, 0)
    assert dyn["tokens"] == int(train["a_attention_mask"].sum() + train["b_attention_mask"].sum())
    (setting,) = doc["settings"]
    assert setting["id"] == "bf16/r4/adamw-0.0001"
    # the slow path is named where it is taken, and in the notes the table prints
    assert [(s["g_b"], s["g_b_reason"]) for s in setting["p_t_states"]] == [("direct", COUPLED)] * 2
    assert any(COUPLED in note and setting["id"] in note for note in doc["notes"])
    # the pooler is a linear layer under all-linear, but a mean-pooling loss never reaches it
    layers = {layer["name"]: layer for layer in setting["layers"]}
    assert layers["pooler.dense"]["no_grad"] is True and layers["pooler.dense"]["beta"] is None
    assert not any(layer["no_grad"] for name, layer in layers.items() if name != "pooler.dense")
    assert layers["encoder.layer.0.attention.self.query"]["beta"] is not None
    # it is reported as such (information, never a veto) and left out of the recommended targets
    pooler = [f for f in doc["findings"] if f["layer"] == "pooler.dense" and f["setting"]]
    assert [(f["rule"], f["severity"]) for f in pooler] == [("layer-gets-no-gradient", "info")]
    rec = doc["recommendation"]
    if rec["lora_config"] is not None:
        targets = rec["lora_config"]["target_modules"]
        assert "pooler.dense" not in targets and "dense" not in targets


FACTORY = '''
import torch
from torch import nn
import torch.nn.functional as F


class Pooled(nn.Module):
    """Two inputs by name, neither input_ids nor inputs: features [N, T, 6] and mask [N, T]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, features, mask):
        h = torch.tanh(self.proj(features)) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))


def build():
    torch.manual_seed(0)
    return Pooled()


def smooth(model, batch):
    logits = model(features=batch["features"], mask=batch["mask"])
    return F.cross_entropy(logits, batch["labels"], label_smoothing=0.1)
'''


@pytest.fixture
def factory_files(tmp_path: Path) -> Path:
    (tmp_path / "pooled.py").write_text(FACTORY, encoding="utf-8")
    torch.manual_seed(0)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("pooled_for_test", tmp_path / "pooled.py")
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    save_file(module.build().state_dict(), str(tmp_path / "pooled.safetensors"))
    g = torch.Generator().manual_seed(2)
    mask = (torch.arange(5)[None] < torch.randint(1, 6, (20,), generator=g)[:, None]).long()
    save_file({"features": torch.randn(20, 5, 6, generator=g), "mask": mask,
               "labels": torch.randint(0, 3, (20,), generator=g)}, str(tmp_path / "feats.safetensors"))
    return tmp_path


@pytest.mark.parametrize("loss", ["pooled.py:smooth", "cross_entropy"])
def test_a_two_input_factory_with_its_own_keys(factory_files, capsys, monkeypatch, loss):
    monkeypatch.chdir(factory_files)
    code = main(["pooled.safetensors", "--model", "pooled.py:build", "--calib", "feats.safetensors", "--loss", loss,
                 "--rank", "2", "--precision", "bf16", "--steps", "2", "--samples", "8", "--micro-batch", "4",
                 "--format", "json", "-q"])
    out, err = capsys.readouterr()
    assert code in (ExitCode.OK, ExitCode.GATE_FAILED), err
    doc = json.loads(out)
    assert doc["dynamic"]["loss"] == loss
    assert doc["dynamic"]["tokens"] == doc["dynamic"]["train_examples"] == 15  # no token ids: examples
    (setting,) = doc["settings"]
    # a mean of per-example terms: the fast path holds
    assert [s["g_b"] for s in setting["p_t_states"]] == ["example shares"] * 2
    assert all(s["g_b_reason"] is None for s in setting["p_t_states"])
    assert not any("p_t g_b" in note for note in doc["notes"])


def test_labels_outside_the_factory_outputs_are_one_data_error(factory_files, capsys, monkeypatch):
    monkeypatch.chdir(factory_files)
    batch = load_calibration("feats.safetensors", user_batch=True)
    batch["labels"][7] = 3
    save_file(batch, str(factory_files / "val.safetensors"))
    code = main(["pooled.safetensors", "--model", "pooled.py:build", "--calib", "feats.safetensors", "--val",
                 "val.safetensors", "--loss", "cross_entropy", "--rank", "2", "-q"])
    err = capsys.readouterr().err
    assert code == ExitCode.DATA
    assert err.count("\n") == 1 and "val.safetensors" in err and "labels hold 3" in err and "3 outputs" in err


# -- the Python API --------------------------------------------------------------------


def test_a_python_function_as_the_loss(bert_dir, pair_files):
    def contrastive(model, batch):
        def embed(ids, mask):
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            return F.normalize((h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True), dim=-1)

        a = embed(batch["a_input_ids"], batch["a_attention_mask"])
        b = embed(batch["b_input_ids"], batch["b_attention_mask"])
        return F.cross_entropy(a @ b.T / 0.05, torch.arange(a.shape[0]))

    plan = DynamicPlan(calib=str(pair_files / "pairs.safetensors"), loss=contrastive,
                       sweep=SweepSpec(precision=["bf16"], rank=[4]), burst=BurstOptions(steps=1, samples=4))
    result = audit(bert_dir, formats=["bf16"], dynamic=plan)
    assert result.dynamic is not None
    assert result.dynamic.loss_name.endswith(":test_a_python_function_as_the_loss.<locals>.contrastive")
    assert result.dynamic.settings[0].pt[0].g_b_reason == COUPLED


def test_data_errors_come_before_the_static_pass(bert_dir, tmp_path):
    """The static pass reports progress per tensor: a bad batch must stop the audit first."""
    bad = pairs()
    bad["b_input_ids"] = bad["b_input_ids"][:5]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    (tmp_path / "loss.py").write_text(CONTRASTIVE, encoding="utf-8")
    seen: list[str] = []
    plan = DynamicPlan(calib=str(tmp_path / "bad.safetensors"), loss=f"{tmp_path / 'loss.py'}:contrastive")
    with pytest.raises(DataError, match="number of examples"):
        audit(bert_dir, dynamic=plan, progress=lambda done, total, name: seen.append(name))
    assert seen == []
    # a loss that fails on the data: also before the static pass
    save_file(pairs(), str(tmp_path / "good.safetensors"))
    plan = DynamicPlan(calib=str(tmp_path / "good.safetensors"), loss=lambda model, batch: batch["missing"].sum())
    with pytest.raises(DataError, match="KeyError"):
        audit(bert_dir, dynamic=plan, progress=lambda done, total, name: seen.append(name))
    assert seen == []


# -- the pieces ------------------------------------------------------------------------


def test_user_batches_are_validated_for_what_every_batch_promises(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file(pairs(6), str(path))
    with pytest.raises(DataError, match=r"no input_ids or inputs.*--loss file\.py:fn"):
        load_calibration(path)  # a built-in loss needs its keys
    batch = load_calibration(path, user_batch=True)
    assert sorted(batch) == ["a_attention_mask", "a_input_ids", "b_attention_mask", "b_input_ids"]
    assert all(v.dtype == torch.int64 for v in batch.values())
    cases = {
        "leading": ({"x": torch.zeros(4, 3), "y": torch.zeros(5)}, "number of examples"),
        "empty": ({"x": torch.zeros(4, 0), "y": torch.zeros(4)}, r"x \(4, 0\) holds no values"),
        "nan": ({"x": torch.tensor([[0.0], [float("nan")]])}, "'x' holds 1 NaN value"),
        "scalar": ({"x": torch.zeros(4), "t": torch.tensor(1.0)}, "no example dimension"),
    }
    for name, (tensors, needle) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad))
        with pytest.raises(DataError, match=needle) as excinfo:
            load_calibration(bad, user_batch=True)
        assert str(bad.name) in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_splitting_sampling_and_token_counts_of_pairs():
    batch = pairs(10, 6)
    train, val = split_batch(batch, 0.25, seed=3)
    assert (len(train["a_input_ids"]), len(val["b_attention_mask"])) == (8, 2)
    for part in (train, val):  # every key keeps its rows aligned
        for i in range(len(part["a_input_ids"])):
            j = batch["a_input_ids"].tolist().index(part["a_input_ids"][i].tolist())
            assert torch.equal(part["b_input_ids"][i], batch["b_input_ids"][j])
            assert torch.equal(part["b_attention_mask"][i], batch["b_attention_mask"][j])
    micro = MicroBatches(train, 3, seed=0)
    seen = [micro.next() for _ in range(2)]
    assert all(len({len(v) for v in m.values()}) == 1 for m in seen)
    assert token_count(batch) == int(batch["a_attention_mask"].sum() + batch["b_attention_mask"].sum())
    no_mask = {"a_input_ids": batch["a_input_ids"], "b_input_ids": batch["b_input_ids"]}
    assert token_count(no_mask) == 2 * 10 * 6
    assert token_count({"features": torch.zeros(7, 3, 2)}) == 7
    assert token_count({"input_ids": torch.zeros(2, 4, dtype=torch.int64),
                        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])}) == 5


def test_a_forward_that_names_its_own_inputs():
    class TwoInputs(nn.Module):
        def forward(self, features, mask):
            return features.sum(-1) * mask

    batch = {"features": torch.ones(2, 3, 4), "mask": torch.ones(2, 3), "labels": torch.zeros(2)}
    args, kwargs = model_inputs(TwoInputs(), batch)
    assert args == () and sorted(kwargs) == ["features", "mask"]
    with pytest.raises(DataError, match=r"no key the model's forward takes \(features, mask\).*--loss"):
        model_inputs(TwoInputs(), {"pixel_values": torch.zeros(2, 3)})


def test_a_headless_model_needs_a_loss_function(bert_dir):
    loaded = build_model(bert_dir)
    ids = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with pytest.raises(UsageError) as excinfo:
        resolve_loss(None, loaded, batch)
    message = str(excinfo.value)
    assert "BertModel" in message and "hidden states" in message and "fn(model, batch) -> scalar tensor" in message
    name, fn = resolve_loss("cross_entropy", loaded, batch)
    with pytest.raises(DataError, match=r"returns hidden states .*last_hidden_state.*--loss file\.py:fn"):
        verify_loss(fn, loaded, batch, None, name=name, micro_batch=2)


def test_held_out_ids_and_labels_are_checked_like_the_calibration_batch(model_hf_llama):
    from hallway_audit.model.losses import causal_lm

    loaded = build_model(model_hf_llama[0])
    ids = torch.randint(0, 64, (6, 5), generator=torch.Generator().manual_seed(0))
    train = {"input_ids": ids, "labels": ids.clone()}
    verify_loss(causal_lm, loaded, train, {"input_ids": ids[:2], "labels": ids[:2].clone()}, name="causal_lm",
                micro_batch=4)
    bad_ids = {"input_ids": ids[:2].clone(), "labels": ids[:2].clone()}
    bad_ids["input_ids"][1, 3] = 64
    with pytest.raises(DataError, match=r"the held-out batch: input_ids holds token id 64, outside .* 64"):
        verify_loss(causal_lm, loaded, train, bad_ids, name="causal_lm", micro_batch=4)
    bad_labels = {"input_ids": ids[:2].clone(), "labels": ids[:2].clone()}
    bad_labels["labels"][0, 2] = 70
    with pytest.raises(DataError, match="the held-out batch: labels hold 70, outside the model's 64 outputs"):
        verify_loss(causal_lm, loaded, train, bad_labels, name="causal_lm", micro_batch=4)
    ignored = {"input_ids": ids[:2].clone(), "labels": ids[:2].clone()}
    ignored["labels"][:, 0] = -100
    verify_loss(causal_lm, loaded, train, ignored, name="causal_lm", micro_batch=4)


# -- the slow path: detected once, named -------------------------------------------------


def _lora(rank: int) -> Setting:
    return Setting(PrecisionStack("bf16", None, "nearest", "fp32"), Subspace("lora", rank, "all-linear"),
                   OptimizerSpec("adamw", 1e-3))


def _loss_module(root: Path):
    from hallway_audit.model.factory import import_object

    return (import_object(f"{root / 'loss.py'}:contrastive", option="--loss", what="function"),
            import_object(f"{root / 'loss.py'}:cosine", option="--loss", what="function"))


def test_a_coupled_loss_is_detected_once_per_setting(bert_dir, pair_files, monkeypatch):
    """Shares are recorded at the first state of each LoRA setting only: once they
    disagree, no later state of that setting records them (the loss couples examples).
    Each setting finds it out for itself, so its figures do not depend on which
    settings ran before it (in one process or on a torchrun rank)."""
    contrastive, cosine = _loss_module(pair_files)
    module = build_model(bert_dir).module
    batch = pairs(12, 8)
    made: list[int] = []
    original = ExampleShares.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ExampleShares, "__init__", counting)
    settings = [Setting(PrecisionStack("bf16", None, "nearest", "fp32"), Subspace("full"), OptimizerSpec("adamw", 1e-3)),
                _lora(2), _lora(4)]
    opts = BurstOptions(steps=1, samples=4, micro_batch=4, early_stop=False)

    def sweep(loss):
        return run_sweep(module, settings=settings, loss_fn=loss, loss_name="t", train=batch, val=None, options=opts,
                         model_source="t", calib="t", val_source="t")

    result = sweep(contrastive)
    assert len(made) == 2  # the first state of each LoRA setting
    full, first, second = result.settings
    assert [s.g_b_reason for s in full.pt] == [NOT_LORA] * 2
    assert [s.g_b for s in first.pt + second.pt] == ["direct"] * 4
    assert [s.g_b_reason for s in first.pt + second.pt] == [COUPLED] * 4
    assert result.notes == [f"p_t g_b of {first.id}, {second.id}: {COUPLED}"]

    made.clear()
    result = sweep(cosine)  # per-pair terms: shares at every state of both LoRA settings
    assert len(made) == 4
    assert [s.g_b for s in result.settings[1].pt + result.settings[2].pt] == ["example shares"] * 4
    assert result.notes == []


def test_gradients_of_the_trained_weights_only_equal_the_full_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    evaluator = LossEvaluator(model, lambda m, b: m(b["input_ids"]).square().mean())
    weights = {k: v.detach() for k, v in model.named_parameters()}
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]])}
    loss, full = evaluator.loss_and_grad(weights, batch)
    loss_wrt, some = evaluator.loss_and_grad(weights, batch, wrt=["1.weight"])
    assert loss == loss_wrt and list(some) == ["1.weight"]
    assert torch.equal(some["1.weight"], full["1.weight"])
