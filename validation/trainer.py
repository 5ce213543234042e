"""Ground-truth trainer: what a real low-precision / LoRA fine-tuning run achieves.

Independent of the audit on purpose: it imports nothing from hallway_audit but
`hallway_audit.lattice.get_format` (the number formats, tested against ml_dtypes),
so a bug in the probe cannot make the truth agree with the probe. It models what
frameworks do:

* master weights fp32: AdamW updates an fp32 master copy; the forward sees
  Q_F(master) (straight-through gradient), so sub-ULP steps accumulate;
* master weights none: the stored weight lives on F's lattice: after every optimizer
  step w <- Q_F(w), nearest or stochastic (pure bf16 training at a low lr stalls);
* the format applies to every parameter for bf16/fp16 and to linear-layer weights
  only (the output head, norms, biases, embeddings stay fp32) for fp8 / int / nf4 /
  MX formats ("auto"; "all" / "linear" force one or the other);
* LoRA as PEFT / QLoRA run it: the base frozen and stored as Q_F(W0), adapters
  (alpha = r, B = 0 at the start) trained in fp32 (or bf16) and never re-quantized
  onto F; the forward is Q_F(W0) + (alpha/r) B A;
* lr constant, or linear warmup then cosine decay to lr_min over the run.

Progress = relative drop of a fixed held-out loss, (L0 - L_N) / L0.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from hallway_audit.lattice import get_format

if TYPE_CHECKING:
    from subjects import Subject

#: bump when the trainer's behaviour changes: cached runs of another version are redone
TRAINER_VERSION = 1
#: formats cast onto every parameter under scope "auto" (what mixed/pure 16-bit training does)
CAST_ALL = ("bf16", "fp16", "fp32")
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8, "int4": 4, "nf4": 4,
        "mxfp8": 8, "mxfp4": 4, "nvfp4": 4}


@dataclass(frozen=True)
class Setting:
    """One training plan. rank 0 = full fine-tuning."""

    precision: str = "fp32"
    rank: int = 0
    targets: str = "all-linear"  # all-linear | attention (LoRA only)
    lr: float = 1e-4
    master: str = "fp32"  # fp32 | none (full fine-tuning only; LoRA adapters follow `adapters`)
    rounding: str = "nearest"  # nearest | stochastic (used by master none)
    schedule: str = "constant"  # constant | cosine | linear (linear warmup, then cosine or linear decay to lr_min)
    warmup: float = 0.1  # fraction of the run
    lr_min: float = 1e-6
    scope: str = "auto"  # auto | all | linear: which parameters the format applies to
    adapters: str = "fp32"  # fp32 | bf16: what LoRA adapters are stored in

    @property
    def id(self) -> str:
        parts = [self.precision, f"r{self.rank}" if self.rank else "full"]
        if self.rank and self.targets != "all-linear":
            parts.append(self.targets)
        parts.append(f"lr{self.lr:g}")
        if self.rank == 0 and self.master == "none":
            parts.append("nomaster-sr" if self.rounding == "stochastic" else "nomaster")
        if self.schedule != "constant":
            parts.append(f"{self.schedule}{self.warmup:g}-{self.lr_min:g}")
        if self.scope != "auto":
            parts.append(f"scope-{self.scope}")
        if self.rank and self.adapters != "fp32":
            parts.append(f"ad-{self.adapters}")
        return "/".join(parts)

    @property
    def key(self) -> str:
        """The id as a file name."""
        return re.sub(r"[^A-Za-z0-9.+-]", "_", self.id)

    @property
    def bits(self) -> int:
        return BITS.get(self.precision, 32)

    @property
    def cost_order(self) -> tuple[float, int]:
        """The audit's recommendation order: lowest rank (full last), then fewest bits."""
        return (self.rank if self.rank else math.inf, self.bits)

    def lr_at(self, step: int, total: int) -> float:
        if self.schedule == "constant":
            return self.lr
        warm = max(1, math.ceil(self.warmup * total))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        if self.schedule == "linear":
            return self.lr_min + (self.lr - self.lr_min) * (1.0 - t)
        if self.schedule != "cosine":
            raise ValueError(f"unknown schedule {self.schedule!r}")
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * t))


@dataclass
class RunResult:
    subject: str
    setting: dict[str, Any]
    setting_id: str
    seed: int
    steps: int
    heldout: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    train: list[float] = field(default_factory=list)  # micro-batch loss per step
    step_seconds: list[float] = field(default_factory=list)  # cumulative training wall time after each step
    eval_seconds: float = 0.0  # one held-out evaluation
    wall_s: float = 0.0
    trainable: int = 0
    quantized: int = 0
    version: int = TRAINER_VERSION
    subject_version: str = ""  # Subject.version: the task's data this run trained on

    @property
    def l0(self) -> float:
        return self.heldout[0][1]

    def loss_at(self, step: int) -> float:
        return next(loss for s, loss in self.heldout if s == step)

    def progress(self, step: int | None = None) -> float:
        """(L0 - L_step) / L0 on the held-out set (the last step by default)."""
        end = self.heldout[-1][1] if step is None else self.loss_at(step)
        return (self.l0 - end) / self.l0 if math.isfinite(end) else -1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["progress"] = self.progress()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunResult:
        d = {k: v for k, v in d.items() if k != "progress"}
        d["heldout"] = [tuple(x) for x in d["heldout"]]
        return cls(**d)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's linear layers): a linear layer whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def stored_transposed(m: nn.Module, attr: str) -> bool:
    """Whether a parameter is a Conv1D weight, stored (in, out) for the (out, in) matrix it acts as."""
    return attr == "weight" and is_conv1d(m)


def on_lattice(fmt: Any, w: torch.Tensor, transposed: bool = False, rounding: str = "nearest",
               gen: torch.Generator | None = None) -> torch.Tensor:
    """Q_F(w) for a format from get_format; a Conv1D weight is quantized as the (out, in) matrix
    it acts as, so per-group scales run along the input dimension as they do for nn.Linear."""
    return fmt.quantize(w.T, rounding, gen).T if transposed else fmt.quantize(w, rounding, gen)


class FakeQuant(nn.Module):
    """Parametrization: the forward sees Q_F(w), the gradient passes straight through."""

    def __init__(self, fmt_name: str, transposed: bool = False) -> None:
        super().__init__()
        self.fmt, self.transposed = get_format(fmt_name), transposed

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = on_lattice(self.fmt, w, self.transposed)
        return w + (q - w).detach()


def quantize_(t: torch.Tensor, fmt_name: str, rounding: str = "nearest", gen: torch.Generator | None = None,
              transposed: bool = False) -> None:
    """Write Q_F(t) into t (the stored weight lives on F's lattice)."""
    with torch.no_grad():
        t.copy_(on_lattice(get_format(fmt_name), t, transposed, rounding, gen))


def linear_names(model: nn.Module, heads: tuple[str, ...]) -> list[str]:
    """Module paths of the linear layers (nn.Linear, Conv1D), the output head(s) excluded (PEFT's all-linear)."""
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and not any(name == h or name.endswith("." + h) for h in heads):
            out.append(name)
    return out


def target_names(model: nn.Module, targets: str, heads: tuple[str, ...], attention: tuple[str, ...]) -> list[str]:
    names = linear_names(model, heads)
    if targets == "all-linear":
        return names
    if targets == "attention":
        return [n for n in names if any(n == s or n.endswith("." + s) for s in attention)]
    if targets == "mlp":
        return [n for n in names if not any(n == s or n.endswith("." + s) for s in attention)]
    pattern = re.compile(targets)
    return [n for n in names if pattern.search(n)]


def quantized_params(model: nn.Module, setting: Setting, heads: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every parameter stored in the setting's format."""
    if setting.precision == "fp32":
        return []
    scope = setting.scope
    if scope == "auto":
        scope = "all" if setting.precision in CAST_ALL else "linear"
    if scope == "all":
        out = []
        for m in model.modules():
            out.extend((m, pname) for pname, p in m.named_parameters(recurse=False) if p.dtype.is_floating_point)
        return out
    mods = dict(model.named_modules())
    return [(mods[n], "weight") for n in linear_names(model, heads)]


def evaluate(model: nn.Module, subject: Subject, batch: dict[str, torch.Tensor]) -> float:
    """Mean loss over the held-out set in chunks of subject.eval_chunk examples."""
    n = next(iter(batch.values())).shape[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, subject.eval_chunk):
            chunk = {k: v[i : i + subject.eval_chunk] for k, v in batch.items()}
            total += float(subject.loss(model, chunk))
            count += 1
    return total / count


def _lora(model: nn.Module, subject: Subject, setting: Setting) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = target_names(model, setting.targets, subject.heads, subject.attention)
    mods = dict(model.named_modules())
    config = LoraConfig(r=setting.rank, lora_alpha=setting.rank, lora_dropout=0.0, target_modules=names, bias="none",
                        fan_in_fan_out=any(is_conv1d(mods[n]) for n in names))
    return get_peft_model(model, config)


def train(subject: Subject, setting: Setting, seed: int, steps: int, eval_every: int = 10,
          eval_at: tuple[int, ...] = (), micro_batch: int = 8, horizon: int | None = None) -> RunResult:
    """One run: `steps` AdamW steps on fresh micro-batches of the subject's task.

    `horizon` is the length the lr schedule is laid over (default `steps`): a k-step
    trial of a 200-step plan runs the plan's first k steps, warmup included.
    """
    total = horizon or steps
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)  # data
    rgen = torch.Generator().manual_seed(20_000 + seed)  # stochastic rounding
    model = subject.load_model()
    model.train()  # subjects build models without dropout: train() == eval()
    heldout = subject.heldout()
    quant = quantized_params(model, setting, subject.heads)
    result = RunResult(subject.name, asdict(setting), setting.id, seed, steps, subject_version=subject.version)
    result.quantized = sum(getattr(m, a).numel() for m, a in quant)

    adapters: list[nn.Parameter] = []
    master_params: list[tuple[nn.Parameter, bool]] = []  # (weight on F's lattice, stored transposed)
    if setting.rank:
        for m, a in quant:  # base stored in F, frozen
            quantize_(getattr(m, a), setting.precision, transposed=stored_transposed(m, a))
        model = _lora(model, subject, setting)
        adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        params = adapters
        if setting.adapters != "fp32":
            for p in adapters:
                quantize_(p, setting.adapters)
    else:
        for m, a in quant:
            if setting.master == "none":
                quantize_(getattr(m, a), setting.precision, transposed=stored_transposed(m, a))
            parametrize.register_parametrization(m, a, FakeQuant(setting.precision, stored_transposed(m, a)))
        if setting.master == "none":
            master_params = [(m.parametrizations[a].original, stored_transposed(m, a)) for m, a in quant]
        params = [p for p in model.parameters() if p.requires_grad]
    result.trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=setting.lr_at(0, total), weight_decay=0.0)
    fmt = get_format(setting.precision)

    t_eval = time.perf_counter()
    result.heldout.append((0, evaluate(model, subject, heldout)))
    result.eval_seconds = time.perf_counter() - t_eval
    train_time = 0.0
    marks = set(eval_at) | {steps} | set(range(eval_every, steps + 1, eval_every) if eval_every else ())
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = setting.lr_at(step, total)
        batch = subject.sample(micro_batch, gen)
        loss = subject.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, transposed in master_params:  # the weight itself lives on F's lattice
                p.copy_(on_lattice(fmt, p, transposed, setting.rounding, rgen))
            if setting.rank and setting.adapters != "fp32":
                for p in adapters:
                    p.copy_(get_format(setting.adapters).quantize(p, setting.rounding, rgen))
        train_time += time.perf_counter() - t0
        result.train.append(float(loss.detach()))
        result.step_seconds.append(train_time)
        if step + 1 in marks:
            result.heldout.append((step + 1, evaluate(model, subject, heldout)))
    result.wall_s = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- cache


def cache_path(out: Path, subject: str, setting: Setting, seed: int, steps: int, kind: str = "truth") -> Path:
    return out / "runs" / subject / f"{kind}__{setting.key}__s{seed}__n{steps}.json"


def cached_train(out: Path, subject: Subject, setting: Setting, seed: int, steps: int, kind: str = "truth",
                 **kwargs: Any) -> RunResult:
    """train() with its result cached as JSON under out/runs/, keyed by subject+setting+seed+steps;
    a result from another trainer version or another version of the subject's data is redone."""
    path = cache_path(out, subject.name, setting, seed, steps, kind)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == TRAINER_VERSION and data.get("subject_version", "") == subject.version:
                return RunResult.from_json(data)
        except (ValueError, TypeError, KeyError):
            pass
    result = train(subject, setting, seed, steps, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_json()))
    tmp.replace(path)
    return result
