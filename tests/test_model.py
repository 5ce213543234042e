"""hallway_audit.model: building runnable models, calibration batches, losses.

Every model here is built in a temporary directory from a local config; nothing
is downloaded. Error tests check the exception class (hence the exit code) and
that the message is one line naming the thing and the problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.errors import DataError, ExitCode, HallwayError, ModelError, UsageError
from hallway_audit.model import (
    LOSSES,
    LoadedModel,
    MicroBatches,
    batch_size,
    build_model,
    checked_loss,
    load_calibration,
    resolve_loss,
    split_batch,
    to_device,
)
from hallway_audit.model.losses import causal_lm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


def one_line_error(excinfo: pytest.ExceptionInfo[HallwayError], code: ExitCode, *words: str) -> str:
    """Assert the error's exit code, that it is one line, and that it names each word."""
    err = excinfo.value
    assert err.exit_code == code
    text = str(err)
    assert "\n" not in text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    return text


def net_state(seed: int) -> dict[str, torch.Tensor]:
    """The state of the factories' Net with weights different from a fresh one."""
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(16, 8, generator=g),
        "net.0.bias": torch.randn(16, generator=g),
        "net.2.weight": torch.randn(4, 16, generator=g),
        "net.2.bias": torch.randn(4, generator=g),
    }


# -- Hugging Face causal LM ----------------------------------------------------


def test_hf_llama_reproduces_logits(model_hf_llama):
    path, original = model_hf_llama
    loaded = build_model(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "hf-causal-lm"
    assert loaded.source == f"transformers LlamaForCausalLM from {path}/config.json"
    assert not loaded.module.training
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert {"input_ids", "attention_mask", "labels"} <= set(loaded.input_names)
    # tied embedding: saved once, still one tensor after loading
    assert loaded.module.lm_head.weight.data_ptr() == loaded.module.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(input_ids=ids).logits, original(input_ids=ids).logits)


def test_causal_lm_equals_hf_loss(model_hf_llama):
    path, _ = model_hf_llama
    loaded = build_model(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not scored
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    hf = loaded.module(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(causal_lm(loaded.module, batch), hf)
    # no labels: input_ids with padding ignored
    unlabelled = {"input_ids": ids, "attention_mask": mask}
    hf_unlabelled = loaded.module(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    assert torch.equal(causal_lm(loaded.module, unlabelled), hf_unlabelled)
    name, fn = resolve_loss(None, loaded, batch)
    assert (name, fn) == ("causal_lm", causal_lm)
    loss = checked_loss(fn, loaded, batch, name=name)
    assert loss.requires_grad and loss.dim() == 0


def test_sharded_hf_directory_loads_every_tensor(ckpt_hf_llama_dir):
    path, state = ckpt_hf_llama_dir
    loaded = build_model(path)
    got = loaded.module.state_dict()
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor.float()), name


def test_bundled_example_builds_and_its_calibration_loads():
    loaded = build_model(EXAMPLE)
    assert loaded.kind == "hf-causal-lm"
    assert loaded.tokenizer is None
    batch = load_calibration(EXAMPLE / "calib.safetensors", tokenizer=loaded.tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch_size(batch) == 32
    assert all(t.dtype == torch.int64 for t in batch.values())
    name, fn = resolve_loss(None, loaded, batch)
    assert name == "causal_lm"
    assert torch.isfinite(checked_loss(fn, loaded, batch))


def test_hf_shape_mismatch_is_a_model_error(model_hf_llama, tmp_path):
    bad = _copy_with_config(model_hf_llama[0], tmp_path / "bad-llama", intermediate_size=48)
    with pytest.raises(ModelError) as excinfo:
        build_model(bad)
    one_line_error(
        excinfo, ExitCode.MODEL, f"model does not match {bad}/", "shape mismatches",
        "mlp.down_proj.weight: model (32, 48), checkpoint (32, 64)",
    )


def test_hf_missing_and_unexpected_keys_are_one_model_error(model_hf_llama, tmp_path):
    from safetensors.torch import load_file

    path, _ = model_hf_llama
    bad = tmp_path / "bad-llama"
    bad.mkdir()
    (bad / "config.json").write_bytes((path / "config.json").read_bytes())
    state = load_file(str(path / "model.safetensors"))
    del state["model.norm.weight"]
    state["model.extra.bias"] = torch.zeros(3)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as excinfo:
        build_model(bad)
    one_line_error(excinfo, ExitCode.MODEL, "1 missing (model.norm.weight)", "1 unexpected (model.extra.bias)")


def test_factory_on_an_hf_directory_ties_weights_and_finds_the_tokenizer(model_hf_llama, tmp_path):
    path, original = model_hf_llama
    factory = tmp_path / "llama_factory.py"
    factory.write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"def build():\n    return LlamaForCausalLM(LlamaConfig.from_pretrained({str(path)!r}))\n",
        encoding="utf-8",
    )
    loaded = build_model(path, f"{factory}:build")
    assert loaded.kind == "factory" and loaded.tokenizer is not None
    module = loaded.module
    assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(module(input_ids=ids).logits, original(input_ids=ids).logits)
    name, fn = resolve_loss("causal_lm", loaded, {"input_ids": ids})
    assert torch.isfinite(checked_loss(fn, loaded, {"input_ids": ids}, name=name))


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_hf_without_architectures_falls_back_to_auto_classes(model_hf_llama, model_hf_bert, tmp_path):
    llama = build_model(_copy_with_config(model_hf_llama[0], tmp_path / "llama", architectures=None))
    assert llama.kind == "hf-causal-lm" and "LlamaForCausalLM" in llama.source
    # a bare encoder: no causal-LM head fits its keys, AutoModel does
    from transformers import BertModel

    bare = tmp_path / "bert-bare"
    BertModel(model_hf_bert[1].config).save_pretrained(bare)
    encoder = build_model(_copy_with_config(bare, tmp_path / "bert", architectures=None))
    assert encoder.kind == "hf" and "BertModel" in encoder.source


def test_hf_custom_code_is_refused(model_hf_llama, tmp_path):
    custom = _copy_with_config(
        model_hf_llama[0], tmp_path / "custom",
        architectures=["MyLlamaForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_my.MyLlamaForCausalLM"},
    )
    with pytest.raises(ModelError) as excinfo:
        build_model(custom)
    one_line_error(excinfo, ExitCode.MODEL, "'MyLlamaForCausalLM' is custom code", "--model module:factory")


def test_hf_without_transformers_is_a_usage_error(model_hf_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(UsageError) as excinfo:
        build_model(model_hf_llama[0])
    one_line_error(excinfo, ExitCode.USAGE, "hallway-audit[hf]")


def test_plain_checkpoint_without_model_is_static_only(tmp_path):
    save_file(net_state(0), str(tmp_path / "w.safetensors"))
    assert build_model(tmp_path / "w.safetensors") is None


# -- tokenizer and text calibration --------------------------------------------


def test_text_and_jsonl_calibration_tokenize(model_hf_llama, model_texts, tmp_path):
    path, _ = model_hf_llama
    loaded = build_model(path)
    assert loaded.tokenizer is not None
    txt = tmp_path / "calib.txt"
    txt.write_text("\n".join(model_texts[:3]) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in model_texts[:3]) + "\n", encoding="utf-8")
    from_txt = load_calibration(txt, tokenizer=loaded.tokenizer)
    from_jsonl = load_calibration(jsonl, tokenizer=loaded.tokenizer)
    assert set(from_txt) == {"input_ids", "attention_mask", "labels"}
    for key in from_txt:
        assert torch.equal(from_txt[key], from_jsonl[key])
    ids, mask, labels = from_txt["input_ids"], from_txt["attention_mask"], from_txt["labels"]
    assert ids.shape == (3, 6)  # padded to the longest line (6 words)
    assert mask.sum(1).tolist() == [6, 5, 3]
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (labels[mask == 0] == -100).all() and (mask == 0).any()
    truncated = load_calibration(txt, tokenizer=loaded.tokenizer, max_length=4)
    assert truncated["input_ids"].shape == (3, 4)
    name, fn = resolve_loss(None, loaded, from_txt)
    assert torch.isfinite(checked_loss(fn, loaded, from_txt, name=name))


def test_text_without_tokenizer_is_a_data_error(tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_calibration(txt)
    one_line_error(excinfo, ExitCode.DATA, str(txt), "needs a tokenizer", "tokenized .safetensors")


def test_jsonl_without_text_field_names_the_line(tmp_path):
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "a"}\n{"prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_calibration(jsonl, tokenizer=object())
    one_line_error(excinfo, ExitCode.DATA, f"{jsonl}:2", '"text"')


# -- HF encoder, model_loss and custom losses ----------------------------------


def test_hf_encoder_model_loss_and_custom_loss_file(model_hf_bert, tmp_path):
    path, original = model_hf_bert
    loaded = build_model(path)
    assert loaded.kind == "hf" and loaded.tokenizer is None
    assert "BertForSequenceClassification" in loaded.source
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 40, (6, 5), generator=g),
        "attention_mask": torch.ones(6, 5, dtype=torch.int64),
        "labels": torch.randint(0, 3, (6,), generator=g),
    }
    with torch.no_grad():
        assert torch.equal(loaded.module(input_ids=batch["input_ids"]).logits, original(input_ids=batch["input_ids"]).logits)

    name, fn = resolve_loss(None, loaded, batch)
    assert name == "model_loss"
    own = checked_loss(fn, loaded, batch, name=name)
    assert torch.equal(own, loaded.module(**batch).loss)
    name, fn = resolve_loss("cross_entropy", loaded, batch)
    assert torch.allclose(checked_loss(fn, loaded, batch, name=name), own)

    loss_file = tmp_path / "loss.py"
    loss_file.write_text(
        "import torch.nn.functional as F\n"
        "def fn(model, batch):\n"
        "    logits = model(input_ids=batch['input_ids']).logits\n"
        "    return F.cross_entropy(logits, batch['labels'], label_smoothing=0.1)\n",
        encoding="utf-8",
    )
    spec = f"{loss_file}:fn"
    name, fn = resolve_loss(spec, loaded, batch)
    assert name == spec
    custom = checked_loss(fn, loaded, batch, name=name)
    assert custom.dim() == 0 and custom.requires_grad and not torch.equal(custom, own)
    assert str(tmp_path) not in sys.path


# -- --model factories ----------------------------------------------------------


@pytest.fixture
def factory_ckpt(tmp_path) -> Path:
    path = tmp_path / "net.safetensors"
    save_file(net_state(7), str(path))
    return path


def test_factory_module_spec_loads_checkpoint(model_factory_file, factory_ckpt, monkeypatch):
    monkeypatch.syspath_prepend(str(model_factory_file.parent))
    monkeypatch.delitem(sys.modules, "factories", raising=False)
    loaded = build_model(factory_ckpt, "factories:build")
    assert loaded.kind == "factory" and loaded.source == "factory factories:build"
    assert loaded.tokenizer is None and loaded.input_names == ("x",)
    assert not loaded.module.training
    for name, tensor in net_state(7).items():
        assert torch.equal(loaded.module.state_dict()[name], tensor)

    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randn(10, 8, generator=g), "targets": torch.randn(10, 4, generator=g)}
    name, fn = resolve_loss(None, loaded, batch)
    assert name == "mse"
    loss = checked_loss(fn, loaded, batch, name=name)
    expected = torch.nn.functional.mse_loss(loaded.module(batch["inputs"]), batch["targets"])
    assert torch.equal(loss, expected)


def test_factory_file_spec_and_tied_weights(model_factory_file, tmp_path):
    loaded = build_model(_saved(tmp_path, net_state(3)), f"{model_factory_file}:build")
    assert torch.equal(loaded.module.net[0].weight, net_state(3)["net.0.weight"])
    assert str(model_factory_file.parent) not in sys.path

    embed = torch.randn(12, 6, generator=torch.Generator().manual_seed(5))
    tied_ckpt = tmp_path / "tied.safetensors"
    save_file({"embed.weight": embed}, str(tied_ckpt))  # head.weight is the same tensor
    tied = build_model(tied_ckpt, f"{model_factory_file}:build_tied")
    assert torch.equal(tied.module.head.weight, embed)
    assert tied.module.head.weight.data_ptr() == tied.module.embed.weight.data_ptr()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "labels": torch.tensor([[2, 3, 4], [5, 6, 7]])}
    name, fn = resolve_loss(None, tied, batch)
    assert name == "cross_entropy"
    assert torch.isfinite(checked_loss(fn, tied, batch))


def test_factory_strips_a_ddp_prefix(model_factory_file, tmp_path):
    state = {f"module.{k}": v for k, v in net_state(2).items()}
    loaded = build_model(_saved(tmp_path, state), f"{model_factory_file}:build")
    assert torch.equal(loaded.module.net[2].bias, net_state(2)["net.2.bias"])


def _saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_factory_checkpoint_mismatch_is_one_model_error(model_factory_file, tmp_path):
    state = net_state(0)
    del state["net.2.weight"], state["net.2.bias"]
    state["head.weight"] = torch.zeros(4, 16)
    state["net.0.weight"] = torch.zeros(8, 16)
    ckpt = _saved(tmp_path, state)
    with pytest.raises(ModelError) as excinfo:
        build_model(ckpt, f"{model_factory_file}:build")
    text = one_line_error(excinfo, ExitCode.MODEL)
    assert text == (
        f"model does not match {ckpt}: 2 missing (net.2.bias, net.2.weight), 1 unexpected "
        "(head.weight), 1 shape mismatch (net.0.weight: model (16, 8), checkpoint (8, 16))"
    )


def test_many_missing_keys_are_counted_not_all_listed(model_factory_file, tmp_path):
    ckpt = _saved(tmp_path, {"other.weight": torch.zeros(2)})
    with pytest.raises(ModelError) as excinfo:
        build_model(ckpt, f"{model_factory_file}:build")
    one_line_error(excinfo, ExitCode.MODEL, "4 missing (net.0.bias, net.0.weight, net.2.bias, ...)", "1 unexpected (other.weight)")


@pytest.mark.parametrize(
    ("attr", "words"),
    [
        ("nope", ["has no attribute 'nope'"]),
        ("NOT_CALLABLE", ["'NOT_CALLABLE' is a int, not callable"]),
        ("returns_dict", ["returned a dict, not a torch.nn.Module"]),
        ("explodes", ["factory raised RuntimeError: boom"]),
    ],
)
def test_unusable_factories_are_model_errors(model_factory_file, factory_ckpt, attr, words):
    with pytest.raises(ModelError) as excinfo:
        build_model(factory_ckpt, f"{model_factory_file}:{attr}")
    one_line_error(excinfo, ExitCode.MODEL, "--model", *words)


def test_factory_module_or_file_not_found(factory_ckpt, tmp_path):
    with pytest.raises(ModelError) as excinfo:
        build_model(factory_ckpt, "no_such_module_xyz:build")
    one_line_error(excinfo, ExitCode.MODEL, "cannot import 'no_such_module_xyz'", "ModuleNotFoundError")
    with pytest.raises(ModelError) as excinfo:
        build_model(factory_ckpt, f"{tmp_path / 'missing.py'}:build")
    one_line_error(excinfo, ExitCode.MODEL, "no such file")
    broken = tmp_path / "broken.py"
    broken.write_text("def build(:\n", encoding="utf-8")
    with pytest.raises(ModelError) as excinfo:
        build_model(factory_ckpt, f"{broken}:build")
    one_line_error(excinfo, ExitCode.MODEL, "SyntaxError")


@pytest.mark.parametrize("spec", ["foo", "foo:", ":build", "mod:not-an-identifier"])
def test_malformed_model_spec_is_a_usage_error(factory_ckpt, spec):
    with pytest.raises(UsageError) as excinfo:
        build_model(factory_ckpt, spec)
    one_line_error(excinfo, ExitCode.USAGE, "--model", "module:factory")


# -- calibration files -----------------------------------------------------------


def test_tensor_formats_load_alike(tmp_path):
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    x = np.linspace(0, 1, 6).reshape(3, 2)  # float64
    np.savez(tmp_path / "c.npz", input_ids=ids, inputs=x)
    torch.save({"input_ids": torch.from_numpy(ids), "inputs": torch.from_numpy(x)}, tmp_path / "c.pt")
    save_file({"input_ids": torch.from_numpy(ids), "inputs": torch.from_numpy(x)}, str(tmp_path / "c.safetensors"))
    batches = [load_calibration(tmp_path / n) for n in ("c.npz", "c.pt", "c.safetensors")]
    for batch in batches:
        assert batch["input_ids"].dtype == torch.int64 and batch["inputs"].dtype == torch.float32
        assert torch.equal(batch["input_ids"], batches[0]["input_ids"])
        assert torch.equal(batch["inputs"], batches[0]["inputs"])


def test_calibration_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_calibration(tmp_path / "nope.safetensors")
    one_line_error(excinfo, ExitCode.DATA, "nope.safetensors", "no such file")


def test_calibration_mismatched_leading_dims(tmp_path):
    path = _saved(tmp_path, {"input_ids": torch.zeros(4, 3, dtype=torch.int64), "labels": torch.zeros(5, dtype=torch.int64)}, "c.safetensors")
    with pytest.raises(DataError) as excinfo:
        load_calibration(path)
    one_line_error(excinfo, ExitCode.DATA, str(path), "number of examples", "input_ids (4, 3)", "labels (5,)")


def test_calibration_with_unknown_keys_only(tmp_path):
    path = _saved(tmp_path, {"x": torch.zeros(4, 3), "y": torch.zeros(4)}, "c.safetensors")
    with pytest.raises(DataError) as excinfo:
        load_calibration(path)
    one_line_error(excinfo, ExitCode.DATA, str(path), "no input_ids or inputs", "found: x, y")


def test_calibration_with_nan_inputs(tmp_path):
    x = torch.zeros(4, 3)
    x[1, 2] = float("nan")
    path = _saved(tmp_path, {"inputs": x, "targets": torch.zeros(4, 1)}, "c.safetensors")
    with pytest.raises(DataError) as excinfo:
        load_calibration(path)
    one_line_error(excinfo, ExitCode.DATA, str(path), "'inputs'", "1 NaN")


@pytest.mark.parametrize("name", ["c.safetensors", "c.pt", "c.npz"])
def test_corrupt_calibration_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x07garbage, not a tensor file at all" * 3)
    with pytest.raises(DataError) as excinfo:
        load_calibration(path)
    one_line_error(excinfo, ExitCode.DATA, str(path))


def test_calibration_unknown_format_and_pickled_objects(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("1,2\n")
    with pytest.raises(DataError) as excinfo:
        load_calibration(csv)
    one_line_error(excinfo, ExitCode.DATA, "unknown calibration format '.csv'")
    np.savez(tmp_path / "o.npz", inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError) as excinfo:
        load_calibration(tmp_path / "o.npz")
    one_line_error(excinfo, ExitCode.DATA, "Python objects")


# -- losses ------------------------------------------------------------------------


@pytest.fixture
def factory_model(model_factory_file, factory_ckpt) -> LoadedModel:
    return build_model(factory_ckpt, f"{model_factory_file}:build")


def _regression_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"inputs": torch.randn(n, 8, generator=g), "targets": torch.randn(n, 4, generator=g)}


def _loss_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "myloss.py"
    path.write_text(f"import torch\ndef fn(model, batch):\n    {body}\n", encoding="utf-8")
    return f"{path}:fn"


def test_loss_that_is_not_a_scalar(factory_model, tmp_path):
    batch = _regression_batch()
    spec = _loss_file(tmp_path, "return ((model(batch['inputs']) - batch['targets']) ** 2).mean(1)")
    name, fn = resolve_loss(spec, factory_model, batch)
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, batch, name=name)
    one_line_error(excinfo, ExitCode.DATA, "is not a scalar: shape (8,)")


def test_nan_loss(factory_model, tmp_path):
    batch = _regression_batch()
    spec = _loss_file(tmp_path, "return model(batch['inputs']).sum() * float('nan')")
    name, fn = resolve_loss(spec, factory_model, batch)
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, batch, name=name)
    one_line_error(excinfo, ExitCode.DATA, "is NaN on the calibration batch")


def test_loss_detached_from_parameters(factory_model, tmp_path):
    batch = _regression_batch()
    spec = _loss_file(tmp_path, "return torch.tensor(float(model(batch['inputs']).sum().detach()))")
    name, fn = resolve_loss(spec, factory_model, batch)
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, batch, name=name)
    one_line_error(excinfo, ExitCode.DATA, "does not depend on the model's parameters")


def test_loss_shapes_that_do_not_fit(factory_model):
    batch = {"inputs": torch.zeros(4, 8), "targets": torch.zeros(4)}
    name, fn = resolve_loss(None, factory_model, batch)
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, batch, name=name)
    one_line_error(excinfo, ExitCode.DATA, "mse", "targets (4,)", "(4, 4)")
    wide = {"inputs": torch.zeros(4, 5), "targets": torch.zeros(4, 4)}
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, wide, name=name)
    one_line_error(excinfo, ExitCode.DATA, "loss 'mse' failed on the calibration batch", "RuntimeError")


def test_model_loss_without_a_loss_output(factory_model):
    batch = {"inputs": torch.zeros(2, 8), "labels": torch.zeros(2, dtype=torch.int64)}
    name, fn = resolve_loss("model_loss", factory_model, batch)
    with pytest.raises(DataError) as excinfo:
        checked_loss(fn, factory_model, batch, name=name)
    one_line_error(excinfo, ExitCode.DATA, "without a .loss", "--loss")


def test_unknown_loss_name_lists_the_registry(factory_model):
    with pytest.raises(UsageError) as excinfo:
        resolve_loss("hinge", factory_model, _regression_batch())
    one_line_error(excinfo, ExitCode.USAGE, "unknown loss 'hinge'", *LOSSES, "module:function")


def test_loss_choice_errors(factory_model, tmp_path):
    with pytest.raises(DataError) as excinfo:
        resolve_loss("mse", factory_model, {"inputs": torch.zeros(2, 8)})
    one_line_error(excinfo, ExitCode.DATA, "loss 'mse' needs 'targets'")
    with pytest.raises(UsageError) as excinfo:
        resolve_loss(None, factory_model, {"inputs": torch.zeros(2, 8)})
    one_line_error(excinfo, ExitCode.USAGE, "cannot choose a loss", "--loss")
    with pytest.raises(UsageError) as excinfo:
        resolve_loss(f"{tmp_path / 'none.py'}:fn", factory_model, _regression_batch())
    one_line_error(excinfo, ExitCode.USAGE, "--loss", "no such file")


def test_token_ids_outside_the_vocabulary(model_hf_llama):
    loaded = build_model(model_hf_llama[0])
    batch = {"input_ids": torch.tensor([[1, 2, 70]])}
    with pytest.raises(DataError) as excinfo:
        checked_loss(causal_lm, loaded, batch)
    one_line_error(excinfo, ExitCode.DATA, "token id 70", "vocabulary of 64")


# -- splitting and sampling ---------------------------------------------------------


def test_split_batch_is_deterministic_and_sized():
    batch = {"inputs": torch.arange(10.0).unsqueeze(1), "targets": torch.arange(10.0)}
    train, val = split_batch(batch)
    again_train, again_val = split_batch(batch)
    assert torch.equal(train["inputs"], again_train["inputs"]) and torch.equal(val["targets"], again_val["targets"])
    assert (batch_size(train), batch_size(val)) == (8, 2)  # round(10 * 0.25) = 2 (banker's rounding of 2.5)
    assert torch.equal(train["inputs"].squeeze(1), train["targets"])  # rows stay aligned across keys
    seen = sorted(train["targets"].tolist() + val["targets"].tolist())
    assert seen == list(map(float, range(10)))
    other_train, _ = split_batch(batch, seed=1)
    assert not torch.equal(other_train["targets"], train["targets"])
    two = {"inputs": torch.zeros(2, 1)}
    assert [batch_size(b) for b in split_batch(two, 0.01)] == [1, 1]
    assert [batch_size(b) for b in split_batch(two, 0.99)] == [1, 1]
    with pytest.raises(DataError) as excinfo:
        split_batch({"inputs": torch.zeros(1, 1)})
    one_line_error(excinfo, ExitCode.DATA, "1 example", "--val")


def test_micro_batches_are_reproducible_per_seed():
    batch = to_device({"inputs": torch.arange(10.0).unsqueeze(1)}, "cpu")

    def draws(seed: int, k: int = 6) -> list[list[float]]:
        mb = MicroBatches(batch, size=3, seed=seed)
        return [mb.next()["inputs"].squeeze(1).tolist() for _ in range(k)]

    first = draws(0)
    assert first == draws(0)
    assert first != draws(1)
    for epoch in (first[:3], first[3:]):  # 3 draws of 3 per epoch of 10, no repeats within one
        flat = [v for draw in epoch for v in draw]
        assert len(flat) == len(set(flat)) == 9
    mb = MicroBatches(batch, size=50, seed=0)
    assert batch_size(mb.next()) == 10 and mb.full() is batch
