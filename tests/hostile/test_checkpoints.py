"""Hostile checkpoints, configs and devices through the real CLI: each case ends with
its exit code and one clean line in bounded time and memory, opens nothing outside
the checkpoint's folder, and leaves its inputs unchanged.

Covers sharded indexes and ONNX external data naming files outside the folder
(absolute paths, "..", escaping links), .pt tensors that are expand()ed views (4e10
elements in 1.7 KB), empty and integer-only checkpoints, config.json files that
describe models no machine can build, too many tensors, and devices the audit cannot
run on.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .harness import assert_refused, assert_unchanged, digest, run_cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-llama"
OUTSIDE_SIZE = 123_457  # a size no message may reveal


@dataclass
class Case:
    args: list[str]
    inputs: list[Path]
    codes: tuple[int, ...]
    needle: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    forbidden: tuple[str, ...] = ()  # text stderr must not contain (what is outside the folder)


def _weights(path: Path, n: int = 2) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({f"layer.{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)}, str(path))
    return path


def _outside(tmp: Path) -> Path:
    """A file beside the checkpoint's folder, of a size no error may reveal."""
    secret = tmp / "secret.safetensors"
    secret.write_bytes(b"\x07" * OUTSIDE_SIZE)
    return secret


def _index(folder: Path, shard_names: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_names}))


def _sharded_with(tmp: Path, other: str) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    _weights(folder / "model-00001.safetensors", 1)
    _index(folder, {"layer.0.weight": "model-00001.safetensors", "layer.1.weight": other})
    return folder


def index_names_etc_passwd(tmp: Path) -> Case:
    folder = _sharded_with(tmp, "/etc/passwd")
    size = str(os.stat("/etc/passwd").st_size) if os.path.exists("/etc/passwd") else "no-such-size"
    return Case([str(folder)], [folder], (3,), "'/etc/passwd' is not a file inside", forbidden=(f"({size} bytes)",))


def index_names_parent_dir(tmp: Path) -> Case:
    _outside(tmp)
    folder = _sharded_with(tmp, "../secret.safetensors")
    return Case([str(folder)], [folder, tmp / "secret.safetensors"], (3,), "not a file inside", forbidden=(str(OUTSIDE_SIZE),))


def index_opened_directly_names_parent_dir(tmp: Path) -> Case:
    _outside(tmp)
    folder = _sharded_with(tmp, "sub/../../secret.safetensors")
    index = folder / "model.safetensors.index.json"
    return Case([str(index)], [folder], (3,), "not a file inside", forbidden=(str(OUTSIDE_SIZE),))


def shard_is_a_link_out_of_the_folder(tmp: Path) -> Case:
    secret = _outside(tmp)
    folder = _sharded_with(tmp, "model-00002.safetensors")
    (folder / "model-00002.safetensors").symlink_to(secret)
    return Case([str(folder)], [folder, secret], (3,), "link that leads outside", forbidden=(str(OUTSIDE_SIZE),))


def directory_file_is_a_link_out_of_the_folder(tmp: Path) -> Case:
    secret = _outside(tmp)
    folder = tmp / "ckpt"
    folder.mkdir()
    _weights(folder / "a.safetensors", 1)
    (folder / "b.safetensors").symlink_to(secret)
    return Case([str(folder)], [folder, secret], (3,), "link that leads outside", forbidden=(str(OUTSIDE_SIZE),))


def hub_cache_snapshot_links_are_allowed(tmp: Path) -> Case:
    """The Hugging Face cache keeps snapshot files as links into the repository's blobs/."""
    repo = tmp / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    blob = _weights(repo / "blobs" / "0123abcd", 2)
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return Case([str(snapshot), "--no-rules"], [repo], (0,))


def _onnx_with_external(tmp: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp / "onnx-model"
    folder.mkdir(exist_ok=True)
    tensor = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[tensor],
    )
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].name == "w"
    return path


def onnx_external_data_at_absolute_path(tmp: Path) -> Case:
    secret = _outside(tmp)
    model = _onnx_with_external(tmp, str(secret))
    return Case([str(model)], [model.parent, secret], (3,), "not a file inside", forbidden=(str(OUTSIDE_SIZE),))


def onnx_external_data_in_parent_dir(tmp: Path) -> Case:
    secret = _outside(tmp)
    model = _onnx_with_external(tmp, "../secret.safetensors")
    return Case([str(model)], [model.parent, secret], (3,), "not a file inside", forbidden=(str(OUTSIDE_SIZE),))


def onnx_external_data_is_a_link_out(tmp: Path) -> Case:
    secret = _outside(tmp)
    model = _onnx_with_external(tmp, "weights.bin")
    (model.parent / "weights.bin").symlink_to(secret)
    return Case([str(model)], [model.parent, secret], (3,), "link that leads outside", forbidden=(str(OUTSIDE_SIZE),))


def onnx_external_length_disagrees_with_dims(tmp: Path) -> Case:
    model = _onnx_with_external(tmp, "weights.bin")
    (model.parent / "weights.bin").write_bytes(b"\0" * 64)
    graph_model = __import__("onnx").load(str(model), load_external_data=False)
    for entry in graph_model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "64"
    model.write_bytes(graph_model.SerializeToString())
    return Case([str(model)], [model.parent], (3,), "external data length is 64")


def onnx_inline_initializer_claims_more_than_it_holds(tmp: Path) -> Case:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], b"\0" * 16, raw=True)
    del tensor.dims[:]
    tensor.dims.extend([100000, 100000])  # 16 bytes stored, 4e10 bytes claimed
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[tensor])
    path = tmp / "claims.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return Case([str(path)], [path], (3,), "need 40000000000 bytes")


def onnx_without_initializers(tmp: Path) -> Case:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp / "relu.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return Case([str(path)], [path], (3,), "holds no initializers")


def pt_with_an_expanded_view(tmp: Path) -> Case:
    path = tmp / "expanded.pt"
    torch.save({"ok.weight": torch.ones(4, 4), "w": torch.zeros(1).expand(200000, 200000)}, path)
    assert path.stat().st_size < 4096
    return Case([str(path)], [path], (3,), "tensor 'w' is a view of 40000000000 elements")


def pt_with_an_overlapping_view(tmp: Path) -> Case:
    base = torch.arange(20, dtype=torch.float32)
    path = tmp / "overlap.pt"
    torch.save({"w": base.as_strided((10, 11), (1, 1))}, path)  # sliding windows: 110 elements over 20
    return Case([str(path)], [path], (3,), "over a storage of 20")


def pt_storage_larger_than_its_record(tmp: Path) -> Case:
    """The pickle promises a 10^9-element storage; the zip record holds 4 elements."""
    import zipfile

    small = tmp / "small.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, small)
    path = tmp / "promises.pt"
    with zipfile.ZipFile(small) as zin, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                big = struct.pack("<i", 10**9)
                data = data.replace(b"q\x06K\x04t", b"q\x06J" + big + b"t").replace(b"K\x00K\x04\x85", b"K\x00J" + big + b"\x85")
            zout.writestr(info, data)
    small.unlink()
    return Case([str(path)], [path], (3,))


def calibration_pt_with_an_expanded_view(tmp: Path) -> Case:
    path = tmp / "calib.pt"
    torch.save({"input_ids": torch.ones(1, 1, dtype=torch.int64).expand(1_000_000, 1224)}, path)
    assert path.stat().st_size < 16384
    return Case([str(EXAMPLE), "--calib", str(path), "--no-rules"], [path, EXAMPLE], (8,), "expand()ed")


def empty_safetensors(tmp: Path) -> Case:
    path = tmp / "empty.safetensors"
    save_file({}, str(path))
    return Case([str(path)], [path], (3,), "holds no tensors")


def empty_state_dict(tmp: Path) -> Case:
    path = tmp / "empty.pt"
    torch.save({}, path)
    return Case([str(path)], [path], (3,), "holds no tensors")


def integer_tensors_only(tmp: Path) -> Case:
    path = tmp / "ints.safetensors"
    save_file({"ids": torch.arange(10), "mask": torch.ones(3, dtype=torch.bool)}, str(path))
    return Case([str(path), "--format", "json"], [path], (0,))


def too_many_tensors_for_the_limit(tmp: Path) -> Case:
    path = tmp / "many.safetensors"
    save_file({f"t.{i}": torch.zeros(1) for i in range(3000)}, str(path))
    return Case([str(path)], [path], (6,), "holds 3000 tensors, more than the limit of 2000",
                env={"HALLWAY_AUDIT_MAX_TENSORS": "2000"})


def header_of_99_mb_with_a_million_entries(tmp: Path) -> Case:
    """Refused from a count of its entries, before json.loads builds an object per entry."""
    n = 1_300_000
    entry = '"t{i:07d}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{j}]}}'
    header = ("{" + ",".join(entry.format(i=i, j=i + 1) for i in range(n)) + "}").encode()
    header += b" " * (-len(header) % 8)
    assert 80e6 < len(header) < 100 * 2**20
    path = tmp / "huge-header.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + b"\0" * n)
    return Case([str(path)], [path], (6,), "holds 1300000 tensors, more than the limit of 200000")


def _hf_dir(tmp: Path, **overrides: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    folder = tmp / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(config).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(overrides)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _calib(tmp: Path) -> Path:
    path = tmp / "calib.safetensors"
    ids = torch.randint(0, 128, (8, 6), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(path))
    return path


def config_with_a_vocabulary_of_2_31(tmp: Path) -> Case:
    folder, calib = _hf_dir(tmp, vocab_size=2**31), _calib(tmp)
    return Case([str(folder), "--calib", str(calib), "--no-rules"], [folder, calib], (6,), "at least 68.7B parameters, 274.9 GB in float32")


def config_with_ten_million_layers(tmp: Path) -> Case:
    folder, calib = _hf_dir(tmp, num_hidden_layers=10_000_000), _calib(tmp)
    # refused by its size (10^10 parameters) or, with that much memory, by the layer limit
    return Case([str(folder), "--calib", str(calib), "--no-rules"], [folder, calib], (6,), "config.json")


def config_with_ten_million_layers_and_memory_to_spare(tmp: Path) -> Case:
    folder, calib = _hf_dir(tmp, num_hidden_layers=10_000_000, hidden_size=1), _calib(tmp)
    return Case([str(folder), "--calib", str(calib), "--no-rules"], [folder, calib], (6,),
                "num_hidden_layers 10000000 is more than the limit of 1024 layers",
                env={"HALLWAY_AUDIT_MEMORY_GB": "1000000"})


def model_larger_than_the_memory_figure(tmp: Path) -> Case:
    """The exact count from the meta-device build (~27k parameters, 0.1 MB) against 50 kB."""
    folder, calib = _hf_dir(tmp), _calib(tmp)
    return Case([str(folder), "--calib", str(calib), "--no-rules"], [folder, calib], (6,),
                "describes a model of exactly 26", env={"HALLWAY_AUDIT_MEMORY_GB": "0.00005"})


def config_is_a_link_to_dev_zero(tmp: Path) -> Case:
    """Not a regular file, so not a Hugging Face directory: the weights alone are audited."""
    folder = tmp / "hf"
    folder.mkdir()
    _weights(folder / "model.safetensors")
    (folder / "config.json").symlink_to("/dev/zero")
    return Case([str(folder), "--no-rules"], [folder], (0,))


def config_is_a_link_out_of_the_folder(tmp: Path) -> Case:
    secret = _outside(tmp)
    folder = tmp / "hf"
    folder.mkdir()
    _weights(folder / "model.safetensors")
    (folder / "config.json").symlink_to(secret)
    return Case([str(folder)], [folder, secret], (3,), "'config.json' is a link that leads outside",
                forbidden=(str(OUTSIDE_SIZE),))


def config_is_a_huge_json_file(tmp: Path) -> Case:
    folder = tmp / "hf"
    folder.mkdir()
    _weights(folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama", "pad": "' + "x" * 4096 + '"}')
    return Case([str(folder)], [folder], (3,), "larger than the limit of 1000 bytes",
                env={"HALLWAY_AUDIT_MAX_JSON_BYTES": "1000"})


def index_with_more_entries_than_the_limit(tmp: Path) -> Case:
    folder = tmp / "ckpt"
    folder.mkdir()
    _weights(folder / "model-00001.safetensors", 1)
    _index(folder, {f"t.{i}": "model-00001.safetensors" for i in range(5000)})
    return Case([str(folder)], [folder], (6,), "holds 5000 tensors, more than the limit of 1000",
                env={"HALLWAY_AUDIT_MAX_TENSORS": "1000"})


def device_meta(tmp: Path) -> Case:
    path = _weights(tmp / "m.safetensors")
    return Case([str(path), "--device", "meta"], [path], (2,), "not a device the audit can run on")


def seed_not_an_integer(tmp: Path) -> Case:
    path = _weights(tmp / "m.safetensors")
    return Case([str(path), "--seed", "1e23"], [path], (2,), "'1e23' is not a valid integer")


def bad_limit_setting(tmp: Path) -> Case:
    path = _weights(tmp / "m.safetensors")
    return Case([str(path)], [path], (2,), "HALLWAY_AUDIT_MAX_TENSORS='lots'", env={"HALLWAY_AUDIT_MAX_TENSORS": "lots"})


CASES: list[Callable[[Path], Case]] = [
    index_names_etc_passwd,
    index_names_parent_dir,
    index_opened_directly_names_parent_dir,
    shard_is_a_link_out_of_the_folder,
    directory_file_is_a_link_out_of_the_folder,
    hub_cache_snapshot_links_are_allowed,
    onnx_external_data_at_absolute_path,
    onnx_external_data_in_parent_dir,
    onnx_external_data_is_a_link_out,
    onnx_external_length_disagrees_with_dims,
    onnx_inline_initializer_claims_more_than_it_holds,
    onnx_without_initializers,
    pt_with_an_expanded_view,
    pt_with_an_overlapping_view,
    pt_storage_larger_than_its_record,
    calibration_pt_with_an_expanded_view,
    empty_safetensors,
    empty_state_dict,
    integer_tensors_only,
    too_many_tensors_for_the_limit,
    header_of_99_mb_with_a_million_entries,
    config_with_a_vocabulary_of_2_31,
    config_with_ten_million_layers,
    config_with_ten_million_layers_and_memory_to_spare,
    model_larger_than_the_memory_figure,
    config_is_a_link_to_dev_zero,
    config_is_a_link_out_of_the_folder,
    config_is_a_huge_json_file,
    index_with_more_entries_than_the_limit,
    device_meta,
    seed_not_an_integer,
    bad_limit_setting,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_checkpoint(tmp_path: Path, build: Callable[[Path], Case]) -> None:
    case = build(tmp_path)
    before = digest(case.inputs)
    outcome = run_cli(case.args, cwd=tmp_path, env=case.env)
    assert_refused(outcome, case.codes, needle=case.needle)
    for text in case.forbidden:
        assert text not in outcome.stderr, outcome.stderr
    assert_unchanged(before, case.inputs)


def test_integer_only_checkpoint_is_audited_with_a_note(tmp_path: Path) -> None:
    case = integer_tensors_only(tmp_path)
    outcome = run_cli(case.args, cwd=tmp_path)
    assert_refused(outcome, 0)
    doc = json.loads(outcome.stdout)
    assert doc["static"]["layers"] == [] and doc["static"]["model"]["params"] == 0
    assert {s["name"] for s in doc["static"]["skipped_tensors"]} == {"ids", "mask"}
    assert set(doc["static"]["model"]["formats"]) == {"bf16", "fp8_e4m3"}


def _allocation_fails_at_once(nbytes: int) -> bool:
    """Linux's default overcommit heuristic (mode 0) refuses a malloc larger than RAM + swap
    on the spot; under mode 1 it would succeed and the kernel's OOM killer act later."""
    import psutil

    try:
        mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        return False
    return mode in ("0", "2") and nbytes > psutil.virtual_memory().total + psutil.swap_memory().total


@pytest.mark.skipif(not _allocation_fails_at_once(2**31 * 32 * 4), reason="needs an OS that refuses a 275 GB malloc")
def test_a_real_cpu_allocation_failure_is_exit_6(tmp_path: Path) -> None:
    """With the memory check overridden, transformers asks torch for 275 GB; torch's CPU
    allocator refuses with a RuntimeError, which is exit 6 like MemoryError."""
    folder, calib = _hf_dir(tmp_path, vocab_size=2**31), _calib(tmp_path)
    before = digest([folder, calib])
    outcome = run_cli([str(folder), "--calib", str(calib), "--no-rules"], cwd=tmp_path,
                      env={"HALLWAY_AUDIT_MEMORY_GB": "1000000"})
    assert_refused(outcome, 6, needle="can't allocate memory")
    assert_unchanged(before, [folder, calib])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["safetensors-100k", "pt-20k"])
def test_many_tiny_tensors_finish(tmp_path: Path, kind: str) -> None:
    """10^5 tensors in one safetensors file, 2*10^4 in a .pt: audited, in bounded time."""
    g = torch.Generator().manual_seed(0)
    if kind == "safetensors-100k":
        path = tmp_path / "many.safetensors"
        save_file({f"layers.{i}.w.weight": torch.randn(4, generator=g) for i in range(100_000)}, str(path))
    else:
        path = tmp_path / "many.pt"
        torch.save({f"layers.{i}.w.weight": torch.randn(4, generator=g) for i in range(20_000)}, path)
    before = digest([path])
    outcome = run_cli([str(path), "--format", "json", "-o", str(tmp_path / "report.json")], cwd=tmp_path, timeout=120)
    assert_refused(outcome, (0, 1), max_seconds=120, max_mb=2500)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["checkpoint"]["tensors"] == (100_000 if kind == "safetensors-100k" else 20_000)
    assert_unchanged(before, [path])
