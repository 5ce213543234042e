"""The bounds hostile inputs are checked against, one by one: limit settings, out-of-memory
recognition, paths confined to a checkpoint's folder, tensors larger than their storage,
config.json sizes, and the batched static measurement that keeps 10^5 tensors linear."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import write_safetensors

from hallway_audit import limits
from hallway_audit.checkpoint import open_checkpoint
from hallway_audit.checkpoint.paths import confined, ensure_inside
from hallway_audit.checkpoint.torch_reader import check_storage, storage_problem
from hallway_audit.errors import CheckpointError, DataError, ResourceError, UsageError
from hallway_audit.lattice import get_format
from hallway_audit.model import size
from hallway_audit.static import measure, run_static
from hallway_audit.static.measure import SMALL_NUMEL, measure_many, measure_tensor
from hallway_audit.static.tally import HIST_BINS, Histogram, histogram_median

PLAIN = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


# -- limit settings --------------------------------------------------------------------


def test_limits_come_from_the_environment_and_bad_values_are_usage_errors(monkeypatch):
    monkeypatch.delenv(limits.MAX_TENSORS_ENV, raising=False)
    assert limits.max_tensors() == limits.MAX_TENSORS_DEFAULT
    monkeypatch.setenv(limits.MAX_TENSORS_ENV, "1_000_000")
    assert limits.max_tensors() == 1_000_000
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv(limits.MAX_TENSORS_ENV, bad)
        with pytest.raises(UsageError, match=limits.MAX_TENSORS_ENV):
            limits.max_tensors()
    monkeypatch.setenv(limits.MEMORY_ENV, "2.5")
    assert limits.available_memory("cpu") == (2_500_000_000, f"{limits.MEMORY_ENV}=2.5")
    for bad in ("-1", "inf"):  # inf once reached int(inf * 1e9): an OverflowError, exit 70
        monkeypatch.setenv(limits.MEMORY_ENV, bad)
        with pytest.raises(UsageError, match="must be a positive number of GB"):
            limits.available_memory("cpu")


def test_tensor_count_limit_names_the_count_the_limit_and_the_variable(monkeypatch):
    monkeypatch.setenv(limits.MAX_TENSORS_ENV, "10")
    limits.check_tensor_count(10, "x")
    with pytest.raises(ResourceError, match=r"x: holds 11 tensors, more than the limit of 10 \(set HALLWAY_AUDIT_MAX_TENSORS"):
        limits.check_tensor_count(11, "x")


def test_torch_allocator_failure_is_recognised_as_out_of_memory():
    with pytest.raises(RuntimeError) as excinfo:  # 1 PiB: more than any address space
        torch.empty(2**50, dtype=torch.uint8)
    assert limits.is_out_of_memory(excinfo.value)
    assert "host" in limits.out_of_memory_message(excinfo.value)
    assert limits.is_out_of_memory(MemoryError())
    assert limits.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert "device" in limits.out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory"))
    assert not limits.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not limits.is_out_of_memory(ValueError("can't allocate memory"))


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../x.safetensors", "sub/../../x.safetensors", "C:\\x.safetensors", "\\\\host\\share\\x", "", "a\x00b"]
)
def test_names_that_leave_the_folder_are_refused_without_looking(tmp_path, name):
    with pytest.raises(CheckpointError, match="is not a file inside the checkpoint's folder: refused"):
        confined(tmp_path, name, where="idx.json", what="shard")


def test_names_inside_the_folder_are_kept(tmp_path):
    (tmp_path / "sub").mkdir()
    assert confined(tmp_path, "a.safetensors", where="i", what="shard") == tmp_path / "a.safetensors"
    assert confined(tmp_path, "sub/./b.safetensors", where="i", what="shard") == tmp_path / "sub" / "b.safetensors"


def test_links_are_followed_and_only_hub_cache_blobs_may_leave(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "inner.bin").write_bytes(b"y")
    (folder / "ok").symlink_to("inner.bin")
    (folder / "out").symlink_to(outside)
    (folder / "dangling-out").symlink_to(tmp_path / "does-not-exist")
    ensure_inside(folder, folder / "ok", where="w", what="f")
    for name in ("out", "dangling-out"):
        with pytest.raises(CheckpointError, match="link that leads outside"):
            ensure_inside(folder, folder / name, where="w", what="f")
    repo = tmp_path / "models--a--b"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"z")
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/abc")
    (snap / "escape").symlink_to(outside)
    ensure_inside(snap, snap / "model.safetensors", where="w", what="f")
    with pytest.raises(CheckpointError):
        ensure_inside(snap, snap / "escape", where="w", what="f")


# -- tensors larger than their storage -----------------------------------------------------


def test_storage_problem_refuses_expanded_and_overlapping_views_only():
    base = torch.arange(20, dtype=torch.float32)
    assert storage_problem("ok", torch.ones(3, 4)) is None
    assert storage_problem("slice", base[5:9]) is None  # a view into a larger storage is fine
    assert storage_problem("t", base.view(4, 5).t()) is None  # non-contiguous, not overlapping
    assert storage_problem("empty", torch.zeros(0, 7)) is None
    expanded = storage_problem("w", torch.zeros(1).expand(1000, 1000))
    assert expanded is not None and "1000000 elements" in expanded and "storage of 1" in expanded
    windows = storage_problem("w", base.as_strided((10, 11), (1, 1)))
    assert windows is not None and "storage of 20" in windows
    tail = storage_problem("w", base[15:].as_strided((3, 3), (1, 1)))  # 9 elements, 5 left past the offset
    assert tail is not None and "storage of 5" in tail
    meta = storage_problem("w", torch.empty(3, device="meta"))
    assert meta is not None and "meta" in meta


def test_check_storage_raises_the_callers_error_class():
    bad = {"ids": torch.ones(1, dtype=torch.int64).expand(10, 10), "note": "not a tensor"}
    with pytest.raises(DataError, match=r"calib\.pt: tensor 'ids' is a view of 100 elements"):
        check_storage(bad, "calib.pt", DataError)
    with pytest.raises(CheckpointError):
        check_storage(bad, "ckpt.pt")
    check_storage({"a": torch.ones(2), "n": 3}, "fine.pt")


# -- config.json sizes ----------------------------------------------------------------------


def test_config_lower_bound_and_layer_count_read_aliases_and_sub_configs():
    gpt2 = {"n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    assert size.params_lower_bound(gpt2) == 50257 * 768 + 12 * 768 * 768
    assert size.layer_count(gpt2) == (12, "n_layer")
    nested = {"model_type": "llava", "text_config": {"hidden_size": 64, "num_hidden_layers": 3, "vocab_size": 100},
              "vision_config": {"hidden_size": 16, "num_hidden_layers": 40}}
    assert size.layer_count(nested) == (40, "num_hidden_layers")
    assert size.params_lower_bound(nested) == max(100 * 64 + 3 * 64 * 64, 40 * 16 * 16)
    assert size.params_lower_bound({"hidden_size": "big", "num_hidden_layers": True}) == 0


def test_config_checks_refuse_with_the_estimate_and_the_memory(monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "16")
    with pytest.raises(ResourceError, match=r"at least 68\.7B parameters, 274\.9 GB in float32; 16\.0 GB HALLWAY_AUDIT_MEMORY_GB=16"):
        size.check_config_size({"vocab_size": 2**31, "hidden_size": 32}, "d/", "cpu")
    monkeypatch.setenv(limits.MEMORY_ENV, "1e9")
    with pytest.raises(ResourceError, match="num_hidden_layers 5000 is more than the limit of 1024 layers"):
        size.check_config_size({"num_hidden_layers": 5000, "hidden_size": 8}, "d/", "cpu")
    monkeypatch.setenv(limits.MAX_LAYERS_ENV, "5000")
    size.check_config_size({"num_hidden_layers": 5000, "hidden_size": 8}, "d/", "cpu")


def test_meta_device_count_is_the_real_models_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = LlamaForCausalLM(config)
        counted = size.meta_param_count(lambda: LlamaForCausalLM(config))
    tensors = {id(t): t for t in [*real.parameters(), *real.buffers()]}
    assert counted == sum(t.numel() for t in tensors.values())  # the tied head counted once
    assert size.meta_param_count(lambda: (_ for _ in ()).throw(RuntimeError("no meta"))) is None


# -- many small tensors ---------------------------------------------------------------------


def _edge_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 6)
    edges = torch.tensor([0.0, -0.0, 1e-40, 2.0**-149, 448.0, 449.0, 1e5, -7e4, 65504.0, 3.0e38, float("nan"), float("inf"), -float("inf")],
                         dtype=torch.float64)
    x = torch.cat([x, edges[: min(len(edges), n)]])[torch.randperm(n + min(len(edges), n), generator=g)][:n]
    return x.to(dtype)


@pytest.mark.parametrize("lr", [1e-5, 1e-2])
def test_measure_many_equals_measure_tensor_for_each_tensor(lr):
    fmts = {n: get_format(n) for n in PLAIN}
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
    tensors = [_edge_values(dtypes[i % len(dtypes)], n, i) for i, n in enumerate([1, 7, 64, 300, SMALL_NUMEL, 13, 2])]
    tensors.append(torch.zeros(0))
    tensors.append(torch.full((5,), float("nan")))
    many = measure_many(tensors, fmts, lr)
    for w, got in zip(tensors, many, strict=True):
        want = measure_tensor(w, fmts, lr, by_pattern=False)
        assert (got.params, got.nonfinite, got.zeros) == (want.params, want.nonfinite, want.zeros)
        for name in PLAIN:
            a, b = got.formats[name], want.formats[name]
            assert (a.n, a.nonzero, a.saturated, a.flushed, a.movable) == (b.n, b.nonzero, b.saturated, b.flushed, b.movable), name
            assert a.signal_sq == pytest.approx(b.signal_sq, rel=1e-6)
            assert a.error_sq == pytest.approx(b.error_sq, rel=1e-5, abs=1e-30), name
            assert torch.equal(a.ulp_rel_hist, b.ulp_rel_hist), name
            assert a.summary()["ulp_rel_median"] == b.summary()["ulp_rel_median"]


def test_measure_many_takes_only_what_it_measures_exactly():
    with pytest.raises(ValueError, match="plain formats"):
        measure_many([torch.ones(3)], {"int8": get_format("int8")}, 1e-4)
    with pytest.raises(ValueError, match="at most"):
        measure_many([torch.ones(SMALL_NUMEL + 1)], {"bf16": get_format("bf16")}, 1e-4)
    assert measure_many([], {"bf16": get_format("bf16")}, 1e-4) == []


def test_run_static_batched_and_one_by_one_agree(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.{part}": torch.randn(*shape, generator=g) * 0.02
             for i in range(30) for part, shape in (("attn.weight", (16, 16)), ("attn.bias", (16,)), ("mlp.weight", (80, 64)))}
    state["blocks.3.attn.weight"][0, 0] = float("nan")
    state["embed.weight"] = torch.randn(300, 64, generator=g)  # over SMALL_NUMEL: measured alone
    path = write_safetensors(tmp_path / "m.safetensors", state)
    with open_checkpoint(path) as ckpt:
        batched = run_static(ckpt, ["bf16", "fp8_e4m3"], 1e-4)
    monkeypatch.setattr(measure, "SMALL_NUMEL", -1)
    monkeypatch.setattr("hallway_audit.static.audit.SMALL_NUMEL", -1)
    with open_checkpoint(path) as ckpt:
        alone = run_static(ckpt, ["bf16", "fp8_e4m3"], 1e-4)
    assert [layer.name for layer in batched.layers] == [layer.name for layer in alone.layers]
    for a, b in zip([*batched.layers, batched], [*alone.layers, alone], strict=True):
        ta, tb = (a.tally, b.tally) if hasattr(a, "tally") else (a.model, b.model)
        assert (ta.params, ta.nonfinite, ta.zeros) == (tb.params, tb.nonfinite, tb.zeros)
        for fmt in ("bf16", "fp8_e4m3"):
            sa, sb = ta.formats[fmt].summary(), tb.formats[fmt].summary()
            for key, value in sa.items():
                assert value == pytest.approx(sb[key], rel=1e-5, nan_ok=True), (fmt, key)


def test_sparse_and_dense_histograms_merge_exactly():
    g = torch.Generator().manual_seed(0)
    dense = torch.randint(0, 5, (HIST_BINS,), generator=g)
    few = torch.zeros(HIST_BINS, dtype=torch.int64)
    few[[3, 700, 2047]] = torch.tensor([5, 1, 9])
    total = Histogram()
    for counts in (few, dense, few, few):
        total += Histogram.of(counts.clone())
    assert torch.equal(total.dense(), dense + 3 * few)
    assert total.median() == histogram_median(dense + 3 * few)
    sparse_only = Histogram()
    for _ in range(3):
        sparse_only += Histogram.of(few.clone())
    assert sparse_only._dense is None  # stays a dict of three bins
    assert sparse_only.median() == histogram_median(3 * few)
    assert Histogram().median() is None


def test_hostile_path_file_is_never_opened(tmp_path):
    """An index naming a FIFO outside the folder would block an open(); it is refused first."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_safetensors(folder / "a.safetensors", {"w": torch.ones(2)})
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors", "v": "../fifo"}}')
    with pytest.raises(CheckpointError, match=r"'\.\./fifo' is not a file inside"):
        open_checkpoint(folder)
    assert Path(fifo).exists()


def test_a_tensor_whose_measurement_cannot_fit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = write_safetensors(tmp_path / "big.safetensors", {"w": torch.zeros(1024, 1024)})
    monkeypatch.setenv(limits.MEMORY_ENV, "0.01")  # 10 MB; int8 needs 5 float32 copies of 4 MB
    with open_checkpoint(path) as ckpt:
        with pytest.raises(ResourceError, match=r"tensor 'w' \(1\.0M elements\) needs about 21\.0 MB to measure \(scaled formats\); 10\.0 MB HALLWAY_AUDIT_MEMORY_GB=0\.01"):
            run_static(ckpt, ["int8"], 1e-4)
        assert run_static(ckpt, ["bf16"], 1e-4).model.params == 2**20  # plain formats stream in chunks
