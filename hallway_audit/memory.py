"""What the dynamic audit will hold in memory, per device, before it runs, and the refusal
(exit 6, with the figures) when a device cannot hold it.

The model follows what a burst keeps alive (probe/burst.py, probe/pt.py, probe/realize.py),
setting by setting (settings run one after another, so a sweep needs its largest setting),
parameter by parameter (so a device map splits it by where each weight lives), in the two
phases that peak: the gradient of the whole training split (at the burst's start and at every
later p_t state: the largest forward with autograd) and p_t's sampling (the most tensors
alive). A device needs the larger of the two; its parts are reported:

* weights: the module's parameters and buffers in the dtype they are held in (float32:
  every LoadedModel is float32); disk-offloaded weights are memory-mapped, so they cost no
  memory here ("disk");
* gradients: dL/dW of every weight in float32 (psi and psi_rank read all of them): while p_t
  samples, three of them at once (a step's, still referenced; p_t's split gradient; its
  held-out gradient) and one more of the trained weights (a sample's g_b); two while the
  split gradient is taken;
* optimizer states: AdamW keeps 2 float32 numbers per trained number (exp_avg,
  exp_avg_sq), SGD with momentum 1;
* trainable: phi (LoRA adapters, or every parameter for full and sparse fine-tuning) in
  float32 -- the fp32 master copy; with master_weights none phi lives on its lattice but is
  still stored in float32 -- plus its snapshots (the burst's start, its end, one per p_t
  state), sparse masks (1 byte per target element) and LoRA's per-example adapter
  gradients (one phi per training example: p_t's optimizer proposals);
* copies: the rounded copy a weight format makes of every frozen weight it applies to (the
  frozen Q(W0)) and, in p_t, two of every trained one (the realized weights of a step and of
  a p_t move), AdamW's preconditioner (one number per trained number) and W-space copies of
  the trained weights (stored, proposed and next weights of a step, the burst's start; p_t's
  stored weights, signal, noise, direction, move and moved weights): WORKING_COPIES;
* activations: the training split's forward and backward, or in p_t the larger of a
  micro-batch's forward and backward and an evaluation forward, from the linear layers (below);
* activation cells: beta_eff's int64 cell id of every output of the probed linear layers
  (the trained ones; every linear layer for full fine-tuning) on the evaluation batch, two
  steps' worth. For a 7B Llama with --eval-batch 16 at 512 tokens that is ~150 GB: the term
  that grows fastest with the model.

Activations. Autograd saves the input of every linear layer and of the elementwise ops
between them (norms, activation functions, residuals, rotary embeddings); measured with
torch.autograd.graph.saved_tensors_hooks (storages counted once) on three Llama configs
built from transformers configs (hidden 32/256/384, intermediate 64/688/1024, 2/4/8 layers,
vocab 128/8000/16000; sdpa attention, which saves no T x T scores), the saved bytes were
1.08-1.13 x 4 x tokens x sum over nn.Linear of (in_features + out_features) -- a steadier
unit than layers x hidden, whose factor ranged 21-29 over the same configs. The loss adds a
transient of the logits and their log-softmax: the peak of a forward and backward, measured
with torch.profiler's memory events (profile_memory=True, every CPU allocation), exceeded
saved activations + gradients by 1.5-2.1 x 4 x tokens x vocab, and a forward without
autograd peaked at 2.0-2.5 x 4 x tokens x vocab. SAVED_PER_LINEAR and LOGITS are those
measurements rounded up. Without autograd, what is alive at once is one block's tensors
besides the logits: on the tiny Llama (vocab 64, where the logits are small) the peak was
0.45 x 4 x tokens x (sum of (in + out) over the linear layers of one block) beyond the logits. `peak_allocated`
is the measurement, for recalibration.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ResourceError, UsageError

# The memory each device holds for the audit, overriding what is measured (the free memory
# of a CUDA device, the available memory of the host): "24GiB", "512MB", "1048576".
from .limits import DEVICE_MEMORY_ENV as DEVICE_MEMORY_ENV

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .probe.burst import BurstOptions
    from .probe.settings import Setting


FLOAT32 = 4
SAVED_PER_LINEAR = 1.15  # saved activations per token, x 4 bytes x sum of linear (in + out): measured 1.08-1.13
LOGITS = 2.5  # logits and log-softmax per token, x 4 bytes x the widest linear output: measured 1.5-2.5
# Eager attention (config._attn_implementation == "eager") also saves each layer's softmax: one
# float per head and key position per token (measured 0.97-0.99 on a 4-layer, 8-head Llama at
# T = 32 and 128); sdpa saves no T x T scores.
ATTENTION_SCORES = 1.0
# beta_eff's activation cells: an int64 cell id per output element of every probed linear layer on
# the evaluation batch, kept for the step before and the step after (burst.py's prev_cells, cells).
CELL_BYTES = 8
CELL_COPIES = 2
# W-space copies of the trained weights alive while p_t samples, beyond gradients, phi, its
# snapshots, optimizer states and preconditioner. Counted among the live tensors at a p_t sample
# (gc, a Llama of 7.3M parameters: hidden 256, 4 layers, vocab 8000): 8 for full fine-tuning,
# 11 for LoRA (whose moves are made in W space: merged W0 + s B A); then raised until no
# torch.profiler peak of a whole sweep (2 steps, p_t at 2 states x 8 samples, 12 x 32 tokens)
# exceeded its estimate on that model and on one of 24.9M (hidden 384, 8 layers, vocab 16000):
# peak / estimate 0.96-0.99 there, 0.80-0.86 on the 2-layer tiny Llama (bench/memory_model.py;
# tests/test_memory.py keeps the tiny Llama's between 1/TOLERANCE and 1).
WORKING_COPIES = {"full": 10, "sparse": 10, "lora": 13}
SPLIT_COPIES = 2  # while the split gradient is taken: the stored weights and the burst's start

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)")
MAX_SIZE = 1 << 60  # an exbibyte: anything larger is a typo


def parse_size(text: object, where: str) -> int:
    """'20GiB', '512MB', '1.5 GB', '1048576' (bytes) -> bytes; a UsageError naming `where` otherwise."""
    expected = "a size such as 20GiB, 512MB or 1048576 (bytes)"
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise UsageError(f"{where}: expected {expected}, got {text!r}")
    match = _SIZE.fullmatch(str(text).strip())
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"{where}: expected {expected}, got {str(text)[:60]!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1 or value > MAX_SIZE:
        raise UsageError(f"{where}: expected {expected} between 1 byte and 1 EiB, got {str(text)[:60]!r}")
    return int(value)


def gib(n: float) -> str:
    """Bytes as the memory lines show them: '3.2 GiB', '120.0 MiB', '512 bytes'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


# --- what a burst holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """Bytes one device holds for one setting, by what they are."""

    weights: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    trainable: int = 0
    copies: int = 0
    activations: int = 0
    activation_cells: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: Need) -> Need:
        return Need(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}

    def parts(self, optimizer: str = "optimizer") -> str:
        """'weights 1.2 GiB, gradients 2.4 GiB, AdamW states ...' (zero parts left out)."""
        names = {"weights": "weights", "gradients": "gradients", "optimizer_states": f"{optimizer} states",
                 "trainable": "trained parameters and snapshots", "copies": "rounded and working copies",
                 "activations": "activations", "activation_cells": "activation cells"}
        return ", ".join(f"{names[f.name]} {gib(getattr(self, f.name))}" for f in fields(self) if getattr(self, f.name))


@dataclass(frozen=True)
class SettingNeed:
    """One setting's need on every device it touches ('disk' holds offloaded weights only)."""

    setting: str
    optimizer: str  # 'AdamW', 'SGD': how the line names its states
    full_size: bool  # trains every parameter (full fine-tuning, sparse masks): phi is model-sized
    devices: dict[str, Need]
    parameter_bytes: int = 0  # the float parameters alone (weights also counts buffers)

    def total(self) -> int:
        """Bytes in memory (disk-offloaded weights are not memory)."""
        return sum(n.total for d, n in self.devices.items() if d != "disk")


@dataclass(frozen=True)
class ActivationShape:
    """What a forward's activations scale with: tokens per example, the sum of every linear
    layer's (in + out) features, the same sum over the largest block (the linear layers under
    one numbered module, such as model.layers.3: what a forward without autograd holds at once)
    and the widest linear output (the logits of an LM head)."""

    tokens_per_example: int
    linear_width: int
    head_width: int
    block_width: int = 0
    attention: int = 0  # layers x heads whose T x T scores autograd saves (eager attention; 0 for sdpa)
    heads: int = 0

    @classmethod
    def of(cls, module: nn.Module, tokens_per_example: int) -> ActivationShape:
        from .probe.targets import linear_dims, linear_modules

        dims = [(n, linear_dims(m)) for n, m in linear_modules(module).items()]
        width = sum(i + o for _, (i, o) in dims)
        head = max((o for _, (_, o) in dims), default=0)
        blocks: dict[str, int] = {}
        for name, (i, o) in dims:
            blocks[_block_of(name)] = blocks.get(_block_of(name), 0) + i + o
        if not dims:  # no linear layer to count: the mean parameter's size, a coarse stand-in
            width = sum(p.numel() for p in module.parameters()) // max(1, sum(1 for _ in module.parameters()))
        config = getattr(module, "config", None)
        eager = getattr(config, "_attn_implementation", None) == "eager"
        layers, heads = (getattr(config, k, 0) for k in ("num_hidden_layers", "num_attention_heads"))
        per_layer = heads if eager and isinstance(heads, int) and isinstance(layers, int) else 0
        return cls(max(1, tokens_per_example), width, head, max(blocks.values(), default=width),
                   per_layer * (layers if isinstance(layers, int) else 0), per_layer)

    def with_grad(self, examples: int) -> int:
        """Peak bytes of a forward and backward over `examples`, beyond the gradients."""
        tokens = examples * self.tokens_per_example
        scores = ATTENTION_SCORES * self.attention * self.tokens_per_example  # eager: T scores per head and token
        return int(FLOAT32 * tokens * (SAVED_PER_LINEAR * self.linear_width + LOGITS * self.head_width + scores))

    def without_grad(self, examples: int) -> int:
        """Peak bytes of a forward under no_grad over `examples`: the logits and one block."""
        tokens = examples * self.tokens_per_example
        scores = 2 * self.heads * self.tokens_per_example  # one layer's scores and softmax (eager)
        return int(FLOAT32 * tokens * (LOGITS * self.head_width + self.block_width + scores))


def _block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3'; a name with no numbered part is its own block."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


@dataclass(frozen=True)
class MemoryEstimate:
    """The sweep's need per setting and device; a sweep needs its largest setting on each device."""

    settings: tuple[SettingNeed, ...]
    shape: ActivationShape
    device_map: bool = False  # weights placed by a device map (--device-map)
    notes: tuple[str, ...] = ()

    def devices(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.settings:
            for d in s.devices:
                seen.setdefault(d, None)
        return sorted(seen, key=_device_order)

    def largest(self, device: str) -> SettingNeed | None:
        """The setting that needs the most on `device`."""
        candidates = [s for s in self.settings if device in s.devices]
        return max(candidates, key=lambda s: s.devices[device].total, default=None)

    def need(self, device: str) -> Need:
        s = self.largest(device)
        return s.devices[device] if s is not None else Need()

    @property
    def total(self) -> int:
        """Bytes in memory on every device together for the largest setting."""
        return max((s.total() for s in self.settings), default=0)

    def to_dict(self) -> dict[str, object]:
        """For the report's dynamic section: bytes, deterministic (no free-memory figures)."""
        return {
            "total_bytes": self.total,
            "devices": {d: {**self.need(d).as_dict(), "setting": getattr(self.largest(d), "setting", None)}
                        for d in self.devices()},
            "settings": {s.setting: s.total() for s in self.settings},
            "activation_shape": {"tokens_per_example": self.shape.tokens_per_example,
                                 "linear_width": self.shape.linear_width, "head_width": self.shape.head_width,
                                 "block_width": self.shape.block_width},
            "model": f"hallway_audit.memory: saved activations {SAVED_PER_LINEAR} x sum(linear in+out), logits "
                     f"{LOGITS} x widest output, working copies of the trained weights {WORKING_COPIES}",
        }


def _device_order(device: str) -> tuple[int, str]:
    return ({"cpu": 1, "disk": 2}.get(device.split(":")[0], 0), device)


# --- the estimate ----------------------------------------------------------------------------------


def param_places(module: nn.Module) -> dict[str, tuple[str, str]]:
    """Float parameter name -> (where its weight is stored, where its tensors are computed):
    the tensor's device, or 'disk' (computed on cpu) when the module's device map
    (hf_device_map, set by --device-map loading) offloads its module to disk."""
    device_map: Mapping[str, object] = getattr(module, "hf_device_map", None) or {}
    out: dict[str, tuple[str, str]] = {}
    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        where = str(p.device)
        if device_map and mapped_place(device_map, name) == "disk":
            out[name] = ("disk", "cpu")
        else:
            out[name] = (where, where)
    return out


def mapped_place(device_map: Mapping[str, object], name: str) -> object:
    """Where a device map puts parameter `name`: its longest mapped module prefix ("" maps
    everything); None when no prefix is mapped."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


def _buffers(module: nn.Module) -> dict[str, int]:
    """Bytes of buffers per device (RoPE tables, norms' running statistics)."""
    out: dict[str, int] = {}
    for b in module.buffers():
        out[str(b.device)] = out.get(str(b.device), 0) + b.numel() * b.element_size()
    return out


def estimate_memory(
    module: nn.Module,
    settings: Sequence[Setting],
    options: BurstOptions,
    *,
    train_examples: int,
    val_examples: int,
    tokens_per_example: int,
) -> MemoryEstimate:
    """Every setting's need per device, before any burst (see the module docstring)."""
    from .lattice import get_format
    from .probe.estimate import pt_states
    from .probe.targets import parameter_universe, select_targets

    params = parameter_universe(module)
    places = param_places(module)
    tensors = dict(module.named_parameters())
    buffers = _buffers(module)
    shape = ActivationShape.of(module, tokens_per_example)
    states = len(pt_states(options.steps, options.p_every))
    eval_examples = min(options.eval_batch, train_examples)
    micro_examples = min(options.micro_batch, train_examples)
    held_out = min(options.eval_batch, val_examples)
    # the split gradient (and the held-out one, in p_t's setup) against p_t's passes
    split_act = shape.with_grad(max(train_examples, held_out))
    sample_act = max(shape.with_grad(micro_examples), shape.without_grad(eval_examples))
    compute_numel: dict[str, int] = {}
    for p in params:
        cd = places[p.name][1]
        compute_numel[cd] = compute_numel.get(cd, 0) + _numel(p.shape)
    all_numel = max(1, sum(compute_numel.values()))
    eval_tokens = eval_examples * shape.tokens_per_example
    linear = {p.name for p in params if p.linear}

    out = []
    for setting in settings:
        sub, prec, opt = setting.subspace, setting.precision, setting.optimizer
        fmt_rounds = get_format(prec.weights).name != "fp32"
        cast_all = prec.applies_to_all()
        targets = {p.name for p in select_targets(list(params), sub.targets)} if sub.kind in ("lora", "sparse") else set()
        # the linear layers whose outputs beta_eff reads: the trained ones (run_burst's `probed`)
        probed = (targets & linear if sub.kind == "lora" else linear) or linear
        per_state = 2 if opt.kind == "adamw" else (1 if opt.momentum else 0)
        working = WORKING_COPIES[sub.kind]
        split: dict[str, dict[str, int]] = {}  # device -> part -> bytes, while the split gradient is taken
        sample: dict[str, dict[str, int]] = {}  # ... while p_t samples

        def add(device: str, part: str, n: int, *phases: dict[str, dict[str, int]]) -> None:
            for phase in phases:
                slot = phase.setdefault(device, {})
                slot[part] = slot.get(part, 0) + int(n)

        both = (split, sample)
        for p in params:
            stored, cd = places[p.name]
            n = _numel(p.shape)
            add(stored, "weights", n * tensors[p.name].element_size(), *both)
            lora = sub.kind == "lora" and p.name in targets
            trained_w = sub.kind != "lora" or lora  # trained in W space: every weight, or a LoRA target
            if sub.kind == "lora":
                phi = min(sub.rank_for(p.layer), *p.shape) * (p.shape[0] + p.shape[1]) if lora else 0
            else:
                phi = n
            add(cd, "optimizer_states", FLOAT32 * per_state * phi, *both)
            trainable = FLOAT32 * phi * (3 + states)  # phi, the burst's start and end, a snapshot per state
            if sub.kind == "sparse" and p.name in targets:
                trainable += n  # the bool mask
            if lora:
                trainable += FLOAT32 * phi * train_examples  # per-example adapter gradients
            add(cd, "trainable", trainable, *both)
            rounds = fmt_rounds and (cast_all or p.matrix_weight)
            if rounds and (sub.kind == "lora" or not trained_w):
                add(cd, "copies", FLOAT32 * n, *both)  # the frozen base rounded once: Q(W0)
            add(cd, "gradients", FLOAT32 * n * 2, split)
            add(cd, "gradients", FLOAT32 * n * (3 + (1 if trained_w else 0)), sample)
            copies = FLOAT32 * phi if opt.kind == "adamw" else 0  # p_t's preconditioner
            if trained_w:
                add(cd, "copies", FLOAT32 * n * SPLIT_COPIES, split)
                copies += FLOAT32 * n * (working + (2 if rounds and sub.kind != "lora" else 0))
            add(cd, "copies", copies, sample)
            if p.name in probed:
                cells = CELL_BYTES * eval_tokens * p.shape[0]
                add(cd, "activation_cells", cells * CELL_COPIES, split)
                add(cd, "activation_cells", cells, sample)
        for device, nbytes in buffers.items():
            add(device, "weights", nbytes, *both)
        for device, n in compute_numel.items():  # activations where the layers run, by their share
            add(device, "activations", split_act * n // all_numel, split)
            add(device, "activations", sample_act * n // all_numel, sample)
        devices = {}
        for device in sorted(set(split) | set(sample), key=_device_order):
            a, b = Need(**split.get(device, {})), Need(**sample.get(device, {}))
            devices[device] = a if a.total > b.total else b
        out.append(SettingNeed(
            setting=setting.id, optimizer="AdamW" if opt.kind == "adamw" else "SGD momentum",
            full_size=sub.kind != "lora", devices=devices,
            parameter_bytes=sum(tensors[p.name].numel() * tensors[p.name].element_size() for p in params),
        ))
    return MemoryEstimate(tuple(out), shape, device_map=bool(getattr(module, "hf_device_map", None)))


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def tokens_per_example(batch: Mapping[str, torch.Tensor]) -> int:
    """Positions a forward runs per example: the length of every token-id tensor together
    (padding included: the forward computes it), else of a 2-D+ `inputs`; 1 otherwise."""
    from .model.data import token_keys

    keys = token_keys(batch)
    if keys:
        return max(1, sum(int(batch[k].shape[1]) if batch[k].dim() > 1 else 1 for k in keys))
    inputs = batch.get("inputs")
    if inputs is not None and inputs.dim() > 2:  # [N, T, features]
        return int(inputs.shape[1])
    return 1


def sweep_memory(
    module: nn.Module,
    settings: Sequence[Setting],
    options: BurstOptions,
    train: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor] | None,
) -> MemoryEstimate:
    """estimate_memory for the batches a sweep runs on."""
    from .model.data import batch_size

    return estimate_memory(
        module, settings, options, train_examples=batch_size(train),
        val_examples=batch_size(val) if val is not None else 0, tokens_per_example=tokens_per_example(train),
    )


# --- what a device can hold ------------------------------------------------------------------------


def cgroup_available(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """Bytes the process's memory cgroup still allows (limit - usage + inactive file cache,
    which the kernel reclaims first), or None when there is no limit or it cannot be read
    (cgroup v2: memory.max; v1: memory.limit_in_bytes; at the process's own path, else the root
    a container sees)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":  # v2
            candidates.extend((base, "memory.max", "memory.current", "inactive_file") for base in (root / rel, root))
        elif "memory" in controllers.split(","):  # v1
            candidates.extend((base, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                              for base in (root / "memory" / rel, root / "memory"))
    for base, limit_file, usage_file, inactive_key in candidates:
        try:
            raw = (base / limit_file).read_text().strip()
            usage = int((base / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None  # no limit where the process lives
        inactive = 0
        try:
            for line in (base / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(raw) - usage + inactive), "left under this process's memory cgroup limit"
    return None


def host_available() -> tuple[int, str]:
    """The host memory the audit may still use: psutil's available, or less where a memory
    cgroup (a container's limit) allows less."""
    import psutil

    free, source = int(psutil.virtual_memory().available), "available on this host"
    cgroup = cgroup_available()
    if cgroup is not None and cgroup[0] < free:
        return cgroup
    return free, source


def capacity(device: str, held: int) -> tuple[int, str]:
    """(bytes `device` can hold for the audit, how that was found). `held`: bytes of the
    audit already on it (the loaded weights), which a free-memory figure no longer counts."""
    from . import limits

    override = limits.memory_override()
    if override is not None:
        return override
    free, source = limits.available_memory(device)  # CUDA free memory, or the host's (cgroup-aware)
    if not device.startswith("cuda"):
        replicas = _replicas_on_node()
        if replicas > 1:  # torchrun: every local rank holds its own replica in the host's memory
            free, source = free // replicas, f"{source}, shared by {replicas} ranks"
    return free + held, f"{gib(free)} {source} + {gib(held)} of weights already loaded"


def _replicas_on_node() -> int:
    """Processes of a torchrun job on this node (LOCAL_WORLD_SIZE, else WORLD_SIZE); 1 alone."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        raw = os.environ.get(name, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return 1


def memory_lines(estimate: MemoryEstimate) -> list[str]:
    """The plan's memory line per device: the largest setting's need, its parts, and what the
    device can hold ('disk': the offloaded weights)."""
    lines = []
    for device in estimate.devices():
        setting = estimate.largest(device)
        if setting is None:
            continue
        need = setting.devices[device]
        if device == "disk":
            lines.append(f"memory: {gib(need.weights)} of weights offloaded to disk (memory-mapped)")
            continue
        can, source = capacity(device, need.weights)
        lines.append(f"memory: up to ~{gib(need.total)} on {device} for {setting.setting} "
                     f"({need.parts(setting.optimizer)}); {device} can hold {gib(can)} ({source})")
    return lines


# --- the refusal -----------------------------------------------------------------------------------


def check_memory(estimate: MemoryEstimate, hint: str = "") -> None:
    """Refuse (exit 6, one line with the figures) when a device cannot hold the largest setting,
    or when a device map offloads weights to disk and a setting trains every parameter (its
    trained copy, gradients and optimizer states must be in memory: the bytes are named)."""
    disk = estimate.need("disk").weights
    if estimate.device_map and disk:
        for setting in estimate.settings:
            if setting.full_size:
                raise ResourceError(full_size_message(setting, disk))
    for device in estimate.devices():
        largest = estimate.largest(device)
        if device == "disk" or largest is None:
            continue
        need = largest.devices[device]
        can, source = capacity(device, estimate.need(device).weights)
        if need.total <= can:
            continue
        if estimate.device_map and largest.full_size:
            raise ResourceError(full_size_message(largest, 0, device, can, source))
        raise ResourceError(
            f"setting {largest.setting} needs ~{gib(need.total)} on {device} ({need.parts(largest.optimizer)}) "
            f"but {device} can hold {gib(can)} ({source}); try {hint or suggestion(estimate, largest)}"
        )


def suggestion(estimate: MemoryEstimate, setting: SettingNeed) -> str:
    """What would shrink the largest part of the need, as a short list."""
    tips = []
    need = _sum(setting.devices.values())
    if need.activations + need.activation_cells > need.total // 4:
        tips.append("a smaller calibration batch (fewer examples or a lower --max-length) or a smaller --eval-batch")
    if setting.full_size:
        tips.append("a LoRA setting (--rank 16)")
    if not estimate.device_map and torch_cuda_count() > 1:
        tips.append("--device-map auto to spread the model over the GPUs (LoRA settings)")
    tips.append(f"another device, or {DEVICE_MEMORY_ENV} if the free-memory figure is wrong")
    return ", ".join(tips)


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def full_size_message(setting: SettingNeed, disk: int, device: str = "", can: int = 0, source: str = "") -> str:
    """What training every parameter needs in memory, in bytes: parameters, gradients, optimizer
    states (and the rest), against what the device map leaves."""
    total = _sum(setting.devices.values())
    rest = total.trainable + total.copies + total.activations + total.weights - setting.parameter_bytes  # + buffers
    why = (f"the device map offloads {disk:,} bytes of weights to disk, and trained weights cannot stay there"
           if disk else f"{setting.devices[device].total:,} of them on {device}, which can hold {can:,} bytes ({source})")
    return (
        f"setting {setting.setting} trains every parameter: it needs {total.total:,} bytes in memory (parameters "
        f"{setting.parameter_bytes:,} bytes, gradients {total.gradients:,} bytes, {setting.optimizer} states "
        f"{total.optimizer_states:,} bytes, buffers, trained copies, snapshots and activations {rest:,} bytes); {why}: "
        "audit "
        "a LoRA setting (--rank 16), or give --max-memory room for the whole model"
    )


def _sum(needs: Iterable[Need]) -> Need:
    out = Need()
    for n in needs:
        out = out + n
    return out


# --- measuring, for calibration ---------------------------------------------------------------------


@dataclass
class Peak:
    """Bytes allocated by torch at the peak of a call, beyond what was allocated before it."""

    bytes: int = 0
    events: int = 0
    notes: list[str] = field(default_factory=list)


def peak_allocated(fn: Callable[[], object], device: torch.device | str = "cpu") -> Peak:
    """The peak of torch's allocations while `fn` runs: torch.cuda.max_memory_allocated on
    CUDA, torch.profiler's memory events (every CPU allocation and free) on the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return Peak(torch.cuda.max_memory_allocated(dev) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = best = 0
    for _, nbytes in events:
        current += nbytes
        best = max(best, current)
    return Peak(best, len(events))
