"""Checkpoint readers: every format round-trips exactly, bad input fails in one line.

All files are written here, in tmp_path, from tiny real models.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import torch
from safetensors.torch import save_file

from hallway_audit.checkpoint import (
    Checkpoint,
    TensorInfo,
    group_layers,
    layer_name,
    open_checkpoint,
    reader_names,
    register_reader,
    registry,
)
from hallway_audit.errors import CheckpointError, ExitCode, UnknownNameError

# -- helpers -------------------------------------------------------------------


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, dtype and shape included (float8 has no torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def assert_reads_back(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    infos = ckpt.infos()
    assert {i.name for i in infos} == set(state)
    for info, tensor in ckpt:
        ref = state[info.name]
        assert info.dtype == ref.dtype and info.shape == tuple(ref.shape)
        assert info.nbytes == ref.numel() * ref.element_size()
        assert same(tensor, ref), info.name
    assert ckpt.total_params == sum(t.numel() for t in state.values())
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in state.values())


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fails(path: Path, *words: str) -> str:
    """open + read everything must raise one CheckpointError line containing `words`,
    and leave every file untouched."""
    root = path if path.is_dir() else path.parent
    before = digest(root)
    with pytest.raises(CheckpointError) as caught, open_checkpoint(path) as ckpt:
        for _ in ckpt:
            pass
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.CHECKPOINT
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    assert digest(root) == before
    return message


def rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file with its JSON header changed by edit(header)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def export_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    # onnxscript is not installed, so the legacy TorchScript exporter (dynamo=False).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"]
        )


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


# -- safetensors -----------------------------------------------------------------


def test_safetensors_single_file_round_trips_every_dtype(tmp_path, ckpt_mixed_state):
    path = tmp_path / "model.safetensors"
    save_file(ckpt_mixed_state, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "safetensors" and ckpt.config is None and ckpt.path == path
        assert_reads_back(ckpt, ckpt_mixed_state)
        assert all(i.source == path for i in ckpt.infos())
        assert ckpt.infos() == ckpt.infos()  # stable order
        assert ckpt.read("enc.3.weight").dtype == torch.float8_e4m3fn


def test_safetensors_directory_without_index_reads_all_files(tmp_path, ckpt_mixed_state):
    names = sorted(ckpt_mixed_state)
    save_file({k: ckpt_mixed_state[k] for k in names[:4]}, str(tmp_path / "a.safetensors"))
    save_file({k: ckpt_mixed_state[k] for k in names[4:]}, str(tmp_path / "b.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.kind == "safetensors-sharded"
        assert_reads_back(ckpt, ckpt_mixed_state)
        assert [i.source.name for i in ckpt.infos()] == ["a.safetensors"] * 4 + ["b.safetensors"] * 4


def test_duplicate_tensor_across_files_is_an_error(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    fails(tmp_path, "'w'", "twice", "a.safetensors", "b.safetensors")


# -- Hugging Face ------------------------------------------------------------------


def test_hf_sharded_safetensors_directory(ckpt_hf_llama_dir):
    path, state = ckpt_hf_llama_dir
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 2 and (path / "model.safetensors.index.json").is_file()
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "hf"
        assert ckpt.config["model_type"] == "llama" and ckpt.config["hidden_size"] == 32
        assert ckpt.weights_layout == "safetensors-sharded"
        assert_reads_back(ckpt, state)
        assert sorted({i.source.name for i in ckpt.infos()}) == shards
        layers = group_layers(ckpt.infos())
        assert [i.name for i in layers["model.layers.0.self_attn.q_proj"]] == [
            "model.layers.0.self_attn.q_proj.weight"
        ]
        assert "lm_head" in layers and "model.norm" in layers


def test_safetensors_index_opened_directly(ckpt_hf_llama_dir):
    path, state = ckpt_hf_llama_dir
    with open_checkpoint(path / "model.safetensors.index.json") as ckpt:
        assert ckpt.kind == "safetensors-sharded" and ckpt.config is None
        assert_reads_back(ckpt, state)


def test_hf_directory_with_pytorch_model_bin(tmp_path, ckpt_hf_llama_dir):
    src, state = ckpt_hf_llama_dir
    one = tmp_path / "bin"
    one.mkdir()
    shutil.copy(src / "config.json", one / "config.json")
    torch.save(state, one / "pytorch_model.bin")
    # A pickle that needs code beside the weights must be ignored, not loaded.
    torch.save({"args": _Evil(tmp_path / "pwned")}, one / "training_args.bin")
    with open_checkpoint(one) as ckpt:
        assert ckpt.kind == "hf" and ckpt.weights_layout == "torch"
        assert_reads_back(ckpt, state)
    assert not (tmp_path / "pwned").exists()


def test_hf_directory_with_sharded_pytorch_bins(tmp_path, ckpt_hf_llama_dir):
    src, state = ckpt_hf_llama_dir
    out = tmp_path / "sharded-bin"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    weight_map = {}
    for shard, keys in halves.items():
        torch.save({k: state[k] for k in keys}, out / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(out) as ckpt:
        assert ckpt.kind == "hf" and ckpt.weights_layout == "torch"
        assert_reads_back(ckpt, state)
        assert [i.name for i in ckpt.infos()] == names  # state dict (module) order kept


# -- torch state dicts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3, "lr": 1e-4},
        lambda sd: {"model": sd, "optimizer_name": "adam"},
    ],
    ids=["plain", "state_dict-key", "model-key"],
)
def test_torch_state_dicts(tmp_path, ckpt_tiny_model, wrap):
    state = ckpt_tiny_model.state_dict()
    path = tmp_path / "model.pt"
    torch.save(wrap(state), path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "torch"
        assert_reads_back(ckpt, state)
        assert [i.name for i in ckpt.infos()] == list(state)


def test_torch_non_tensor_entries_are_skipped_and_parameters_become_tensors(tmp_path, ckpt_tiny_model):
    params = dict(ckpt_tiny_model.named_parameters())
    path = tmp_path / "weights.pth"
    torch.save({**params, "note": "hello", "version": 2}, path)
    with open_checkpoint(path) as ckpt:
        assert [i.name for i in ckpt.infos()] == list(params)
        tensor = ckpt.read("0.weight")
        assert type(tensor) is torch.Tensor and same(tensor, params["0.weight"].detach())


def test_torch_legacy_non_zip_format(tmp_path, ckpt_mixed_state):
    # torch's legacy (pre-1.6) format cannot round-trip float8 even in torch itself.
    state = {k: v for k, v in ckpt_mixed_state.items() if v.dtype != torch.float8_e4m3fn}
    path = tmp_path / "legacy.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        assert_reads_back(ckpt, state)


def test_directory_with_a_single_torch_file(tmp_path, ckpt_tiny_model):
    torch.save(ckpt_tiny_model.state_dict(), tmp_path / "only.pt")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.kind == "torch" and ckpt.path == tmp_path
        assert_reads_back(ckpt, ckpt_tiny_model.state_dict())


# -- ONNX ---------------------------------------------------------------------------


def test_onnx_initializers_are_what_onnxruntime_runs(tmp_path, ckpt_tiny_model):
    path = tmp_path / "mlp.onnx"
    x = torch.randn(3, 16)
    export_onnx(ckpt_tiny_model, path, x)
    with open_checkpoint(path) as ckpt:
        assert ckpt.kind == "onnx"
        assert_reads_back(ckpt, ckpt_tiny_model.state_dict())
        rebuilt = copy.deepcopy(ckpt_tiny_model)
        rebuilt.load_state_dict({info.name: t for info, t in ckpt}, strict=True)
    expected = run_ort(path, x)
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(x).numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ckpt_tiny_model(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def _save_external(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )


def test_onnx_external_data(tmp_path, ckpt_tiny_model):
    src = tmp_path / "inline.onnx"
    x = torch.randn(2, 16)
    export_onnx(ckpt_tiny_model, src, x)
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    _save_external(src, ext_dir / "model.onnx")
    assert (ext_dir / "weights.bin").stat().st_size > 0
    with open_checkpoint(ext_dir / "model.onnx") as ckpt:
        assert {i.source.name for i in ckpt.infos()} == {"weights.bin"}
        assert_reads_back(ckpt, ckpt_tiny_model.state_dict())
    np.testing.assert_allclose(run_ort(ext_dir / "model.onnx", x), run_ort(src, x), rtol=0, atol=0)


def test_onnx_dtypes_map_to_torch(tmp_path):
    from onnx import TensorProto, helper

    g = torch.Generator().manual_seed(2)
    values = {
        "a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(5, generator=g).to(torch.float16),
        "c.weight": torch.randint(-128, 128, (2, 6), generator=g, dtype=torch.int8),
        "d.weight": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),
        "e.weight": torch.randn(2, 2, generator=g, dtype=torch.float64),
    }
    codes = {
        torch.bfloat16: TensorProto.BFLOAT16,
        torch.float16: TensorProto.FLOAT16,
        torch.int8: TensorProto.INT8,
        torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
        torch.float64: TensorProto.DOUBLE,
    }
    inits = [
        helper.make_tensor(name, codes[t.dtype], list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes(), raw=True)
        for name, t in values.items()
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [inp], [out], inits)
    path = tmp_path / "dtypes.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with open_checkpoint(path) as ckpt:
        assert_reads_back(ckpt, values)
        assert [i.name for i in ckpt.infos()] == list(values)  # graph order


# -- layers and registry -----------------------------------------------------------


def test_layer_name_and_grouping():
    assert layer_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj"
    assert layer_name("0.bias") == "0"
    assert layer_name("weight") == ""
    assert layer_name("norm.running_mean") == "norm.running_mean"
    assert layer_name("onnx::MatMul_123") == "onnx::MatMul_123"

    def info(name: str) -> TensorInfo:
        return TensorInfo(name, torch.float32, (2, 3), 24, Path("x"))

    groups = group_layers([info("b.weight"), info("a.weight"), info("b.bias"), info("step")])
    assert list(groups) == ["b", "a", "step"]
    assert [i.name for i in groups["b"]] == ["b.weight", "b.bias"]
    assert info("z").numel == 6


def test_registry_lists_formats_and_takes_one_entry_per_format(tmp_path, monkeypatch):
    assert reader_names() == ["hf", "safetensors-sharded", "safetensors", "onnx", "torch"]
    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))

    class NpzCheckpoint(Checkpoint):
        def __init__(self, path: Path) -> None:
            super().__init__(path, "npz")
            self._arrays = dict(np.load(path))
            self._set_infos(
                TensorInfo(k, torch.from_numpy(v).dtype, v.shape, v.nbytes, path) for k, v in self._arrays.items()
            )

        def _read(self, info: TensorInfo) -> torch.Tensor:
            return torch.from_numpy(self._arrays[info.name])

    register_reader("npz", lambda p: p.suffix == ".npz", NpzCheckpoint)
    np.savez(tmp_path / "w.npz", w=np.arange(6, dtype=np.float32).reshape(2, 3))
    with open_checkpoint(tmp_path / "w.npz") as ckpt:
        assert ckpt.kind == "npz" and same(ckpt.read("w"), torch.arange(6.0).reshape(2, 3))
    assert reader_names()[-1] == "npz"
    with pytest.raises(ValueError, match="already registered"):
        register_reader("npz", lambda p: False, NpzCheckpoint)


def test_forcing_a_reader_by_name(tmp_path):
    path = tmp_path / "weights.data"  # unknown extension, but really safetensors
    save_file({"w": torch.ones(3)}, str(path))
    fails(path, "unknown checkpoint format", "'.data'")
    with open_checkpoint(path, reader="safetensors") as ckpt:
        assert same(ckpt.read("w"), torch.ones(3))
    with pytest.raises(UnknownNameError, match="Available: hf"):
        open_checkpoint(path, reader="nope")


def test_read_unknown_name_and_after_close(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    ckpt = open_checkpoint(path)
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ckpt.read("nope")
    ckpt.close()
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.read("w")


# -- bad input -----------------------------------------------------------------------


@pytest.fixture
def good_safetensors(tmp_path, ckpt_tiny_model) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(ckpt_tiny_model.state_dict(), str(path))
    return path


def test_missing_file(tmp_path):
    fails(tmp_path / "foo.safetensors", "foo.safetensors: no such file")


def test_directory_without_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "empty/: no weights found", "*.safetensors", "*.onnx")
    (empty / "README.md").write_text("not weights")
    fails(empty, "no weights found")


def test_directory_with_several_unindexed_weight_files(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "a.pt")
    torch.save({"b": torch.ones(1)}, tmp_path / "b.pt")
    fails(tmp_path, "several weight files", "a.pt", "b.pt")


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF\r\n")
    fails(path, "weights.h5", "unknown checkpoint format")


def test_truncated_safetensors(good_safetensors, tmp_path):
    raw = good_safetensors.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    (n,) = struct.unpack("<Q", raw[:8])
    assert len(raw) // 2 > 8 + n  # the cut falls in the data, not the header
    fails(cut, "cut.safetensors: truncated: header promises", f"file has {len(raw) // 2 - 8 - n}")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    fails(path, "junk.safetensors: not a safetensors file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    fails(tiny, "not a safetensors file", "too short")


def test_header_claims_more_data_than_exists(good_safetensors, tmp_path):
    bad = tmp_path / "liar.safetensors"

    def grow_last(header: dict) -> None:
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        entry = header[name]
        entry["shape"] = [entry["shape"][0] * 100, *entry["shape"][1:]]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin, begin + (end - begin) * 100]

    rewrite_header(good_safetensors, bad, grow_last)
    fails(bad, "liar.safetensors: truncated: header promises")


def test_header_length_larger_than_file(good_safetensors, tmp_path):
    raw = good_safetensors.read_bytes()
    bad = tmp_path / "long.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    fails(bad, "long.safetensors", f"header length {len(raw) * 2} is larger than the file ({len(raw)} bytes)")


def test_header_not_json_and_bad_entries(good_safetensors, tmp_path):
    bad = tmp_path / "nojson.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    fails(bad, "nojson.safetensors", "not valid JSON")

    odd = tmp_path / "dtype.safetensors"
    rewrite_header(good_safetensors, odd, lambda h: h["0.bias"].update(dtype="F6_E2M3"))
    fails(odd, "dtype.safetensors", "'0.bias'", "unsupported dtype 'F6_E2M3'")

    overlap = tmp_path / "overlap.safetensors"

    def overlap_first_two(h: dict) -> None:
        # LayerNorm weight and bias have the same size: point both at the same bytes.
        h["2.bias"]["data_offsets"] = h["2.weight"]["data_offsets"]

    rewrite_header(good_safetensors, overlap, overlap_first_two)
    fails(overlap, "overlap.safetensors", "data_offsets", "overlap tensor")

    mismatch = tmp_path / "shape.safetensors"
    rewrite_header(good_safetensors, mismatch, lambda h: h["0.bias"].update(shape=[33]))
    fails(mismatch, "'0.bias'", "needs 132 bytes", "hold 128")


def test_sharded_index_naming_a_missing_shard(tmp_path, ckpt_hf_llama_dir):
    src, _ = ckpt_hf_llama_dir
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(src, ckpt_dir)
    (ckpt_dir / "model-00002-of-00003.safetensors").unlink()
    message = fails(ckpt_dir / "model.safetensors.index.json", "shard 'model-00002-of-00003.safetensors' is missing")
    assert message.startswith(f"{ckpt_dir}/model.safetensors.index.json:")
    fails(ckpt_dir, "shard 'model-00002-of-00003.safetensors' is missing")


def test_sharded_index_malformed(tmp_path, ckpt_hf_llama_dir):
    src, _ = ckpt_hf_llama_dir
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(src, ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-20])
    fails(index, "model.safetensors.index.json: malformed index", "not valid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    fails(ckpt_dir, "malformed index", "weight_map")


def test_index_mapping_a_tensor_to_the_wrong_shard(tmp_path, ckpt_hf_llama_dir):
    src, _ = ckpt_hf_llama_dir
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(src, ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    fails(index, "'lm_head.weight'", "'model-00001-of-00003.safetensors'", "does not hold it")


class _Evil:
    """Unpickling this would create a file: weights_only must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_pickle_needing_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": _Evil(marker)}, path)
    fails(path, "evil.pt: refuses to unpickle code", "open")
    assert not marker.exists()


def test_torch_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(1).bytes(500))
    fails(junk, "junk.pt: not a readable torch checkpoint")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:700])
    fails(cut, "cut.pt: not a readable torch checkpoint")
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    fails(listed, "list.pt: holds a list, not a state dict")
    empty = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, empty)
    fails(empty, "meta.pt: holds no tensors", "'epoch'")


def test_onnx_missing_external_data(tmp_path, ckpt_tiny_model):
    src = tmp_path / "inline.onnx"
    export_onnx(ckpt_tiny_model, src, torch.randn(1, 16))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    _save_external(src, ext_dir / "model.onnx")
    (ext_dir / "weights.bin").unlink()
    fails(ext_dir / "model.onnx", "model.onnx: external data file 'weights.bin'", "is missing")


def test_onnx_truncated_external_data_and_garbage(tmp_path, ckpt_tiny_model):
    src = tmp_path / "inline.onnx"
    export_onnx(ckpt_tiny_model, src, torch.randn(1, 16))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    _save_external(src, ext_dir / "model.onnx")
    data = ext_dir / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    fails(ext_dir / "model.onnx", "weights.bin: truncated")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    fails(junk, "junk.onnx: not a valid ONNX model")


def test_hf_bad_config_and_no_weights(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{oops")
    fails(hf, "config.json: malformed config")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fails(hf, "hf/: config.json found but no weights")


# -- streaming -----------------------------------------------------------------------


def _sparse_safetensors(path: Path, tensors: int, numel: int) -> None:
    """A header promising `tensors` x `numel` float32 zeros, the data a sparse hole."""
    nbytes = numel * 4
    header = {f"t{i}.weight": {"dtype": "F32", "shape": [numel], "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(tensors)}
    raw = json.dumps(header).encode()
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + tensors * nbytes)


def test_infos_reads_no_tensor_data(tmp_path):
    path = tmp_path / "huge.safetensors"
    _sparse_safetensors(path, 1, 50_000_000)  # 200 MB promised, nothing on disk
    proc = psutil.Process()
    rss = proc.memory_info().rss
    start = time.perf_counter()
    with open_checkpoint(path) as ckpt:
        infos = ckpt.infos()
    assert time.perf_counter() - start < 1.0
    assert proc.memory_info().rss - rss < 20e6
    assert infos[0].nbytes == 200_000_000 and ckpt.total_params == 50_000_000


def test_iteration_is_lazy_and_memory_stays_near_one_tensor(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    _sparse_safetensors(path, 4, 50_000_000)  # 4 x 200 MB
    proc = psutil.Process()
    with open_checkpoint(path) as ckpt:
        reads: list[str] = []
        inner = ckpt._read
        monkeypatch.setattr(ckpt, "_read", lambda info: reads.append(info.name) or inner(info))
        stream = iter(ckpt)
        assert reads == []  # nothing read before the first step
        rss0 = proc.memory_info().rss
        peak = 0
        for step, (info, tensor) in enumerate(stream, 1):
            assert len(reads) == step and reads[-1] == info.name
            assert float(tensor.sum()) == 0.0  # touch every page
            peak = max(peak, proc.memory_info().rss - rss0)
            del tensor
    assert len(reads) == 4
    assert peak < 600e6, f"resident memory grew by {peak / 1e6:.0f} MB for an 800 MB checkpoint"
