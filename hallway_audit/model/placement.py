"""--device-map / --max-memory: a Hugging Face model larger than one device, placed by accelerate.

The architecture is built without memory (accelerate.init_empty_weights), a device map is
inferred (infer_auto_device_map; balanced: get_balanced_memory first) or read from a file,
and the checkpoint is loaded shard by shard onto it (load_checkpoint_in_model), weights mapped
to "disk" going to an offload folder: a temporary directory removed when the audit ends.

The one step taken differently from load_checkpoint_and_dispatch is the dispatch. The probe
hands every setting's weights to the module through torch.func.functional_call; accelerate's
offload hook (AlignDevicesHook with offload=True) replaces each module's tensors from its
weights_map in pre_forward (set_module_tensor_to_device(..., value=weights_map[name])), so the
supplied tensors would be dropped -- LoRA adapters and rounded weights silently ignored, their
gradients lost (or, for the plain tensors functional_call supplies, a TypeError in that hook;
tests/test_device_map.py checks both stay true of accelerate). So nothing is offloaded by a
hook: weights mapped to disk become float32 memory maps of their offload files (copy-on-write,
read from disk as they are touched), every weight lives where it executes (a GPU, or the CPU
for cpu and disk), and accelerate's dispatch_model attaches hooks with offload=False only:
they move a block's inputs to its device and the model's output back to the input's device.
The probe's own tensors (adapters, rounded copies, gradients, optimizer states) are made on
the device of the weight they belong to.

LoRA is what this serves: its trained part is small. A setting that trains every parameter
(full fine-tuning, sparse masks) holds a float32 copy, gradients and optimizer states of each
in memory wherever the weight is mapped; the memory check (hallway_audit.memory) refuses it
with the bytes when the devices cannot hold that.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, ResourceError, UsageError
from ..limits import is_out_of_memory
from ..memory import gib, mapped_place, parse_size

MAP_CHOICES = ("auto", "balanced")
DISK = "disk"


# --- the plan's values ------------------------------------------------------------------------------


def device_map_value(value: object, where: str) -> str:
    """auto, balanced, or the path of a JSON/YAML file mapping module names to devices."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > 4096:
        raise UsageError(f"{where}: expected auto, balanced or a device map file (JSON: module name -> device), "
                         f"got {str(value)[:60]!r}")
    return value.strip()


def device_key(raw: object, where: str) -> str:
    """A device as the user names it -> 'cuda:N', 'cpu' or 'disk' (0 and '0' are cuda:0)."""
    text = str(raw).strip().lower() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
    if text is None:
        raise UsageError(f"{where}: expected a device (a GPU index, cuda:N, cpu or disk), got {raw!r}")
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text in ("cpu", DISK):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    if text == "cuda":
        return "cuda:0"
    raise UsageError(f"{where}: expected a device (a GPU index, cuda:N, cpu or disk), got {str(raw)[:40]!r}")


def max_memory_value(value: object, where: str) -> dict[str, int | None]:
    """'0=20GiB,cpu=60GiB,disk' (or a mapping) -> {'cuda:0': bytes, 'cpu': bytes, 'disk': None}.

    A device given without a size is unbounded (for disk: any amount may be offloaded);
    disk is used only when it is named."""
    if isinstance(value, Mapping):
        pairs = [(k, v) for k, v in value.items()]
    elif isinstance(value, str) and value.strip():
        pairs = []
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, size = part.partition("=")
            pairs.append((key, size if sep else None))
    else:
        raise UsageError(f"{where}: expected DEVICE=SIZE,... (e.g. 0=20GiB,cpu=60GiB or cpu=2GiB,disk), got {value!r}")
    out: dict[str, int | None] = {}
    for key, size in pairs:
        device = device_key(key, where)
        if device in out:
            raise UsageError(f"{where}: {device} is given twice")
        if size is None or (isinstance(size, str) and not size.strip()):
            if device != DISK:
                raise UsageError(f"{where}: {device} needs a size ({device}=SIZE, e.g. {device}=20GiB); only disk may "
                                 "go without one")
            out[device] = None
        else:
            out[device] = parse_size(size, f"{where}: {device}")
    if not out:
        raise UsageError(f"{where}: expected DEVICE=SIZE,... (e.g. 0=20GiB,cpu=60GiB or cpu=2GiB,disk), got {value!r}")
    return out


@dataclass(frozen=True)
class PlacementSpec:
    """What the user asked for: how to map (auto, balanced, a file) and each device's budget."""

    device_map: str
    max_memory: tuple[tuple[str, int | None], ...] = ()

    @property
    def allows_disk(self) -> bool:
        return any(d == DISK for d, _ in self.max_memory)


# --- what was placed ----------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where each module's weights went, and the offload folder to remove afterwards."""

    device_map: dict[str, str]  # module name -> cuda:N | cpu | disk
    max_memory: dict[str, int]  # the budget accelerate placed the weights under, in bytes
    weight_bytes: dict[str, int]  # float32 weights per place
    _offload: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def offload_dir(self) -> str | None:
        return self._offload.name if self._offload is not None else None

    def close(self) -> None:
        """Remove the offload folder (the memory maps into it stay readable until released)."""
        if self._offload is not None:
            self._offload.cleanup()
            self._offload = None

    def to_dict(self) -> dict[str, object]:
        """For the report: deterministic (no temporary paths)."""
        return {"device_map": dict(self.device_map), "max_memory": dict(self.max_memory),
                "weight_bytes": dict(self.weight_bytes)}


# --- loading -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """accelerate's loading bars (tqdm on stderr) and log lines off: problems come back as our
    errors (its 'parameters are on the meta device' warning would be wrong here: none are)."""
    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _accelerate(where: str) -> Any:
    try:
        import accelerate
    except ImportError as exc:
        raise UsageError(f"{where}: --device-map needs accelerate: install hallway-audit[big]") from exc
    return accelerate


def load_placed(
    path: Path, build_empty: Callable[[], nn.Module], spec: PlacementSpec, where: str,
) -> tuple[nn.Module, Placement]:
    """The model in `path` built on no memory, mapped, loaded and dispatched as the module
    docstring says; raises UsageError (map, devices), ModelError (keys), ResourceError (room)."""
    _accelerate(where)
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import load_checkpoint_in_model

    with init_empty_weights():
        module = build_empty()
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    _check_keys(module, path, where)
    budget = {d: b for d, b in spec.max_memory if b is not None}
    device_map = _loadable(_device_map(module, spec, where), module)
    _check_devices(device_map, where)
    _check_tied(module, device_map, where)
    weight_bytes = _weight_bytes(module, device_map)
    offload = None
    if DISK in device_map.values():
        if not spec.allows_disk and spec.device_map in MAP_CHOICES:  # a map file names disk itself
            placed = sum(weight_bytes.values())
            raise ResourceError(
                f"{where}: the model's {placed:,} bytes of float32 weights do not fit the memory --max-memory allows "
                f"({', '.join(f'{d}={b:,} bytes' for d, b in budget.items()) or 'the devices free memory'}); add disk "
                "to --max-memory to offload the rest to disk (e.g. --max-memory cpu=8GiB,disk)"
            )
        if weight_bytes[DISK] > budget.get(DISK, weight_bytes[DISK]):
            raise ResourceError(f"{where}: the device map offloads {weight_bytes[DISK]:,} bytes of weights to disk, more "
                                f"than --max-memory disk={budget[DISK]:,} bytes allows")
        offload = tempfile.TemporaryDirectory(prefix="hallway-audit-offload-")
        free = shutil.disk_usage(offload.name).free
        if free < weight_bytes[DISK]:
            offload.cleanup()
            raise ResourceError(f"{where}: offloading {gib(weight_bytes[DISK])} of weights to disk needs that much room "
                                f"in {Path(offload.name).parent}, which has {gib(free)} free (set TMPDIR to a larger disk)")
    try:
        with _quiet():
            load_checkpoint_in_model(module, str(path), device_map=_accelerate_map(device_map),
                                     offload_folder=offload.name if offload else None, dtype=torch.float32,
                                     offload_buffers=False, strict=False)
        if offload is not None:
            _map_offloaded(module, Path(offload.name))
    except Exception as exc:
        if offload is not None:
            offload.cleanup()
        if is_out_of_memory(exc):
            raise ResourceError(f"{where}: out of memory loading the model onto its device map: "
                                f"{str(exc).splitlines()[0][:200]}") from exc
        if isinstance(exc, (UsageError, ModelError, ResourceError)):
            raise
        raise ModelError(f"{where}: accelerate cannot load the checkpoint onto the device map: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    empty = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if empty:
        if offload is not None:
            offload.cleanup()
        raise ModelError(f"{where}: {len(empty)} parameters were not loaded ({', '.join(empty[:4])})")
    compute = {k: ("cpu" if v == DISK else v) for k, v in device_map.items()}
    main = "cpu" if "cpu" in compute.values() else compute[next(iter(compute))]
    # offload=False hooks only (main_device cpu: a "cpu" entry runs on the CPU, not streamed to a GPU)
    with _quiet():
        dispatch_model(module, device_map=_accelerate_map(compute), main_device=main, force_hooks=True)
    setattr(module, "hf_device_map", dict(device_map))  # noqa: B010  disk kept: the memory estimate reads where weights are stored
    used = dict(budget.items())
    return module, Placement(device_map=dict(device_map), max_memory=used, weight_bytes=weight_bytes, _offload=offload)


def _loadable(device_map: dict[str, str], module: nn.Module) -> dict[str, str]:
    """accelerate's loader takes a map with one device as the device to load every shard onto,
    which "disk" is not: a map that sends everything to disk is split into submodules and the
    smallest (one without parameters, such as a rotary embedding, where there is one) runs on the CPU."""
    if set(device_map.values()) != {DISK}:
        return device_map
    expanded = dict(device_map)
    for _ in range(3):  # model -> model.model, lm_head -> model.model.layers, ...
        nxt: dict[str, str] = {}
        for key in expanded:
            children = [f"{key}.{n}" if key else n for n, _ in module.get_submodule(key).named_children()]
            own = any(True for _ in module.get_submodule(key).named_parameters(recurse=False))
            nxt.update(dict.fromkeys(children if children and not own else [key], DISK))
        expanded = nxt
        if len(expanded) > 1 and any(_numel(module, k) == 0 for k in expanded):
            break
    if len(expanded) < 2:
        return device_map  # one module holding everything: nothing to split
    smallest = min(expanded, key=lambda k: _numel(module, k))
    expanded[smallest] = "cpu"
    return expanded


def _numel(module: nn.Module, name: str) -> int:
    return sum(p.numel() for p in module.get_submodule(name).parameters())


def _accelerate_map(device_map: Mapping[str, str]) -> dict[str, int | str]:
    """cuda:N -> N, as accelerate's loaders expect GPU indices."""
    return {k: (int(v.split(":")[1]) if v.startswith("cuda:") else v) for k, v in device_map.items()}


def replica_share(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(this process's replica on its node, replicas on the node): torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE (WORLD_SIZE when a launcher sets no local size); (0, 1) for one process."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or "1")
        local = int(env.get("LOCAL_RANK") or "0")
    except ValueError:
        return 0, 1  # the distributed session refuses malformed variables itself
    return (local, size) if size > 1 and 0 <= local < size else (0, 1)


def gpu_group() -> list[int]:
    """The GPUs this process's replica may use: all of them alone; under torchrun, the node's
    GPUs split into LOCAL_WORLD_SIZE contiguous groups, one per local rank."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local, size = replica_share()
    if size == 1:
        return list(range(visible))
    if visible and visible < size:
        raise UsageError(f"--device-map under torchrun: {size} processes on this node share {visible} GPU(s); each "
                         "replica needs its own (start fewer processes per node)")
    per = visible // size
    return list(range(local * per, (local + 1) * per))


def _local(device: str, group: list[int], where: str) -> str:
    """cuda:i of the replica's group -> the absolute GPU (cuda:i alone); other devices as they are."""
    if not device.startswith("cuda:"):
        return device
    i = int(device.split(":")[1])
    if i >= len(group):
        _, size = replica_share()
        scope = f" (under torchrun GPU indices count within each replica's {len(group)} GPU(s))" if size > 1 else ""
        raise UsageError(f"{where}: {device} requested, but torch sees {len(group)} CUDA device(s){scope}")
    return f"cuda:{group[i]}"


def _device_map(module: nn.Module, spec: PlacementSpec, where: str) -> dict[str, str]:
    """module name -> device, inferred by accelerate or read from the user's file. Under torchrun
    each rank places one replica on its own group of GPUs (gpu_group), its GPU indices counted
    within the group, and an inferred map takes its share of the host's memory."""
    from accelerate.utils import check_device_map, get_balanced_memory, get_max_memory, infer_auto_device_map

    group = gpu_group()
    if spec.device_map not in MAP_CHOICES:
        read = _read_map_file(module, spec.device_map, where, check_device_map)
        return {k: _local(v, group, f"--device-map {spec.device_map}: {k}") for k, v in read.items()}
    given = {_local(d, group, "--max-memory"): b for d, b in spec.max_memory if b is not None and d != DISK}
    # accelerate offloads to disk without a budget; the disk-space check bounds it
    max_memory: dict[Any, int] = {(int(d.split(":")[1]) if d.startswith("cuda:") else d): b for d, b in given.items()}
    if not given:
        _, replicas = replica_share()
        found = get_max_memory()
        max_memory = {k: v for k, v in found.items() if k in group}
        if "cpu" in found:
            max_memory["cpu"] = found["cpu"] // replicas
    no_split = list(getattr(module, "_no_split_modules", None) or [])
    if spec.device_map == "balanced":
        max_memory = get_balanced_memory(module, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=torch.float32)
    inferred = infer_auto_device_map(module, max_memory=max_memory, no_split_module_classes=no_split,
                                     dtype=torch.float32)
    return {k: device_key(v, f"{where}: the inferred device map") for k, v in inferred.items()}


def _read_map_file(module: nn.Module, path: str, where: str, check: Callable[..., None]) -> dict[str, str]:
    from ..safe_load import MAX_PLAN_BYTES_ENV, FileProblem, load_json_text, load_yaml_text, max_plan_bytes, read_text

    try:
        text = read_text(path, what="device map", limit=max_plan_bytes(), limit_env=MAX_PLAN_BYTES_ENV)
        data = load_json_text(text) if path.lower().endswith(".json") else load_yaml_text(text, "YAML")
    except FileProblem as exc:
        raise UsageError(f"--device-map {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--device-map {path}: expected a mapping of module names to devices")
    names = dict(module.named_modules())
    out: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or (key and key not in names):
            raise UsageError(f"--device-map {path}: {str(key)[:80]!r} is not a module of the model "
                             f"(modules: {', '.join([n for n in names if n][:5])} ...)")
        out[key] = device_key(value, f"--device-map {path}: {key}")
    try:
        check(module, _accelerate_map(out))
    except ValueError as exc:
        raise UsageError(f"--device-map {path}: {str(exc).splitlines()[0][:300]}") from None
    return out


def _check_devices(device_map: Mapping[str, str], where: str) -> None:
    for device in set(device_map.values()):
        if device.startswith("cuda:"):
            index = int(device.split(":")[1])
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise UsageError(f"--device-map: {device} requested, but torch sees {torch.cuda.device_count()} "
                                 "CUDA device(s)")


def _mapped(device_map: Mapping[str, str], name: str) -> str:
    place = mapped_place(device_map, name)
    if place is None:
        raise UsageError(f"--device-map: no device for {name}")
    return str(place)


def _check_tied(module: nn.Module, device_map: Mapping[str, str], where: str) -> None:
    """Tied weights are one tensor the probe supplies once: their modules must run on one device."""
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(module):
        places = {("cpu" if (d := _mapped(device_map, n)) == DISK else d) for n in group}
        if len(places) > 1:
            raise UsageError(f"--device-map: tied parameters {', '.join(group)} are mapped to different devices "
                             f"({', '.join(sorted(places))}); put their modules on one device")


def _weight_bytes(module: nn.Module, device_map: Mapping[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in module.named_parameters():
        d = _mapped(device_map, name)
        out[d] = out.get(d, 0) + p.numel() * 4
    return out


def _check_keys(module: nn.Module, path: Path, where: str) -> None:
    """Every parameter in the checkpoint, with its shape; nothing the model does not have
    (transformers' from_pretrained raises the same, through hf.py, without a device map)."""
    import re

    from accelerate.utils import find_tied_parameters

    from ..checkpoint import open_checkpoint
    from .state import mismatch_message

    with open_checkpoint(path) as ckpt:
        stored = {i.name: tuple(i.shape) for i in ckpt.infos()}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    tied = find_tied_parameters(module)
    covered = set(stored)
    for group in tied:
        if covered.intersection(group):
            covered.update(group)
    missing = sorted(k for k in params if k not in covered)
    ignore = [re.compile(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(k for k in stored if k not in expected and not any(p.search(k) for p in ignore))
    mismatched = [(k, expected[k], stored[k]) for k in sorted(stored) if k in expected and stored[k] != expected[k]]
    if missing or unexpected or mismatched:
        raise ModelError(mismatch_message(where, missing, unexpected, mismatched)
                         + " (with --device-map the checkpoint's keys are loaded as named; transformers renames some "
                           "on load: audit without --device-map to see whether it does)")


def _map_offloaded(module: nn.Module, folder: Path) -> None:
    """Every weight accelerate offloaded, as a float32 copy-on-write memory map of its file
    (rewritten in float32 first when the checkpoint stored another dtype)."""
    import numpy as np
    from accelerate.utils import offload_weight, set_module_tensor_to_device
    from accelerate.utils.offload import load_offloaded_weight, save_offload_index

    index_path = folder / "index.json"
    index: dict[str, dict[str, Any]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    rewritten = False
    for name, info in list(index.items()):
        if info.get("dtype") != "float32":
            tensor = load_offloaded_weight(str(folder / f"{name}.dat"), info).to(torch.float32)
            offload_weight(tensor, name, str(folder), index=index)
            del tensor
            rewritten = True
    if rewritten:
        save_offload_index(index, str(folder))
    for name, info in index.items():
        shape = tuple(info["shape"]) or (1,)  # accelerate stores a scalar as one element
        array = np.memmap(folder / f"{name}.dat", dtype=np.float32, mode="c", shape=shape)
        tensor = torch.from_numpy(array).reshape(tuple(info["shape"])) if math.prod(shape) else torch.from_numpy(array)
        set_module_tensor_to_device(module, name, "cpu", value=tensor)
