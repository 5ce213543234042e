"""One validation layer for every plan value, wherever it comes from: a command-line
flag, a plan YAML, a PEFT adapter_config.json, or a keyword of `audit()`.

Each key has one checker that takes the value as given (a string from the command
line, a YAML scalar or list, a JSON number) and returns it in one canonical type,
or raises a UsageError of one line naming where the value came from and what was
expected: `plan.yaml: steps: expected an integer from 1 to 10000, got 'abc'`.
YAML's surprises are refused rather than guessed at: a bool where a number is
expected (`steps: yes`), a float where an integer is (`steps: 2.5`), NaN and
infinities, integers past int64, empty lists, mappings where lists belong.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import NoReturn

from ..errors import UsageError
from ..limits import env_int
from ..rules.evaluate import FAIL_ON
from ..safe_regex import compile_pattern

# --- limits (policy: raise one with its environment variable) ------------------------------

MAX_STEPS_ENV, MAX_STEPS_DEFAULT = "HALLWAY_AUDIT_MAX_STEPS", 10_000
MAX_SAMPLES_ENV, MAX_SAMPLES_DEFAULT = "HALLWAY_AUDIT_MAX_SAMPLES", 100_000
MAX_BATCH_ENV, MAX_BATCH_DEFAULT = "HALLWAY_AUDIT_MAX_BATCH", 65_536  # --micro-batch, --eval-batch
MAX_LENGTH_ENV, MAX_LENGTH_DEFAULT = "HALLWAY_AUDIT_MAX_LENGTH", 1 << 20  # --max-length (tokens)
MAX_SETTINGS_ENV, MAX_SETTINGS_DEFAULT = "HALLWAY_AUDIT_MAX_SETTINGS", 1024  # points of one sweep grid
MAX_SIGMA = 1e6  # proposal noise a million times its signal is pure noise; past ~1e150 its norm overflows
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes an int64
MAX_RANK = 1 << 20  # the model then bounds it: no rank above min(in, out) of a targeted layer
MAX_TEXT_CHARS = 4096  # paths, specs, device names
MAX_JOBS = 1024  # --jobs: static audit processes
MAX_RANK_PATTERN_ENTRIES = 4096

MAX_TRAIN_STEPS = 10**7  # the forecast's horizon: more than any fine-tuning run (its lr is an array this long)
SCHEDULES = ("constant", "cosine", "linear")
LORA_BASES = ("frozen", "merged")
QUANTIZE_SCOPES = ("auto", "linear", "all")
ROUNDINGS = ("nearest", "stochastic")
MASTER_WEIGHTS = ("fp32", "none")
OPTIMIZERS = ("adamw", "sgd")
TARGET_NAMES = ("all-linear", "attention", "mlp")

_INT = re.compile(r"[+-]?[0-9]{1,30}")
_show = reprlib.Repr()
_show.maxstring = 60
_show.maxother = 60
_show.maxlist = _show.maxtuple = _show.maxdict = _show.maxset = 4
_show.maxlevel = 2


def show(value: object) -> str:
    """A value as the error line shows it: repr, short, one line."""
    text = _show.repr(value)
    return text.replace("\n", "\\n")


def fail(where: str, expected: str, value: object) -> NoReturn:
    raise UsageError(f"{where}: expected {expected}, got {show(value)}")


# --- scalars --------------------------------------------------------------------------------


def _bound_text(lo: int, hi: int | None) -> str:
    return f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"


def integer(value: object, where: str, lo: int, hi: int | None = None, env: str | None = None) -> int:
    """An int (or its decimal string) in [lo, hi]; bools and floats are refused."""
    expected = _bound_text(lo, hi)
    if isinstance(value, bool):
        fail(where, expected, value)
    if isinstance(value, str):
        text = value.strip()
        if not _INT.fullmatch(text):
            fail(where, expected, value)
        value = int(text)
    if not isinstance(value, int):
        fail(where, expected, value)
    if hi is not None and value > hi and env:
        raise UsageError(f"{where}: expected {expected}, got {value} ({hi} is the limit; set {env} to raise it)")
    if value < lo or (hi is not None and value > hi):
        fail(where, expected, value)
    return value


def limited(env: str, default: int) -> Callable[[object, str], int]:
    def check(value: object, where: str) -> int:
        return integer(value, where, 1, env_int(env, default), env)

    return check


def number(value: object, where: str, *, lo: float = 0.0, strict: bool = True, hi: float = math.inf) -> float:
    """A finite float > lo (>= lo unless strict), at most hi; numeric strings ('1e-4') are numbers."""
    expected = f"a finite number {'>' if strict else '>='} {lo:g}" + (f" and at most {hi:g}" if hi < math.inf else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        fail(where, expected, value)
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        fail(where, expected, value)
    if not math.isfinite(x) or x < lo or (strict and x == lo) or x > hi:
        fail(where, expected, value)
    return x


def boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        fail(where, "true or false", value)
    return value


def text(value: object, where: str, what: str = "a non-empty string") -> str:
    """A non-empty string without NUL bytes, at most MAX_TEXT_CHARS long (paths, specs)."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > MAX_TEXT_CHARS:
        fail(where, what, value)
    return value


def choice(value: object, where: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        fail(where, f"one of {', '.join(allowed)}", value)
    return value


# --- lists ----------------------------------------------------------------------------------


def items(value: object, where: str) -> list[object]:
    """A scalar, a comma-separated string or a list of them, as a non-empty flat list."""
    if isinstance(value, (list, tuple)):
        raw = list(value)
    elif isinstance(value, (str, int, float)):  # bool is an int: the item checker refuses it
        raw = [value]
    else:
        fail(where, "a value or a list of values", value)
    out: list[object] = []
    for item in raw:
        if isinstance(item, str):
            out += [part.strip() for part in item.split(",") if part.strip()]
        elif isinstance(item, (list, tuple, dict, set)) or item is None:
            fail(where, "a list of plain values (no nested lists, mappings or nulls)", value)
        else:
            out.append(item)
    if not out:
        fail(where, "a non-empty list", value)
    return out


def each(check: Callable[[object, str], object]) -> Callable[[object, str], list]:
    def check_list(value: object, where: str) -> list:
        return [check(item, where) for item in items(value, where)]

    return check_list


# --- the plan's own value types --------------------------------------------------------------


def format_name(value: object, where: str) -> str:
    from ..lattice import get_format

    if not isinstance(value, str):
        fail(where, "a format name (see `hallway-audit formats`)", value)
    try:
        return get_format(value).name
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}") from None


def act_format(value: object, where: str) -> str | None:
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return format_name(value, where)


def rank(value: object, where: str) -> int:
    """A LoRA rank: an integer >= 1, or 0 / 'full' / 'none' for full fine-tuning."""
    if isinstance(value, str) and value.strip().lower() in ("full", "none"):
        return 0
    try:
        return integer(value, where, 0, MAX_RANK)
    except UsageError:
        fail(where, f"a rank (an integer from 1 to {MAX_RANK}, or 0 / full for full fine-tuning)", value)


def adapter_rank(value: object, where: str) -> int:
    """A rank_pattern value or PEFT's r: an integer >= 1 (full fine-tuning is not a rank here)."""
    return integer(value, where, 1, MAX_RANK)


def sparsity(value: object, where: str) -> tuple[float, str]:
    from ..probe.settings import parse_sparsity

    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        fail(where, "FRACTION[:magnitude|random|2:4] or 2:4", value)
    if isinstance(value, float) and not math.isfinite(value):
        fail(where, "a fraction in [0, 1)", value)
    try:
        return parse_sparsity(str(value))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message.removeprefix('--sparsity ')}") from None


def targets(value: object, where: str) -> str:
    """all-linear, attention, mlp, or a regular expression that is safe to match."""
    name = text(value, where, "all-linear, attention, mlp or a regular expression")
    if name in TARGET_NAMES:
        return name
    compile_pattern(name, where)
    return name


def rank_pattern(value: object, where: str) -> dict[str, int]:
    """PEFT's rank_pattern: a mapping of module name or regex -> rank >= 1."""
    if not isinstance(value, Mapping):
        fail(where, "a mapping of module name or regex -> rank", value)
    if len(value) > MAX_RANK_PATTERN_ENTRIES:
        fail(where, f"at most {MAX_RANK_PATTERN_ENTRIES} entries", f"{len(value)} entries")
    out: dict[str, int] = {}
    for key, r in value.items():
        if not isinstance(key, str) or not key:
            fail(where, "module names or regexes as keys", key)
        compile_pattern(key, f"{where}: {show(key)}")
        out[key] = adapter_rank(r, f"{where}: {show(key)}")
    return out


def alpha(value: object, where: str) -> float | None:
    return None if value is None else number(value, where)


def rules(value: object, where: str) -> list[str]:
    """A rule file: a bundled name or a path; or a list of them (not comma-separated: paths may hold commas)."""
    raw = [value] if isinstance(value, str) else value
    if not isinstance(raw, (list, tuple)) or not raw:
        fail(where, "a rule file name or a non-empty list of them", value)
    return [text(item, where, "rule file names (strings)") for item in raw]


def lr(value: object, where: str) -> float:
    return number(value, where)


# --- the keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A plan key: its checker, and whether it means anything without --calib."""

    check: Callable[[object, str], object]
    dynamic: bool

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")


def _checker(f: Callable[..., object], **kwargs: object) -> Callable[[object, str], object]:
    return lambda value, where: f(value, where, **kwargs)


KEYS: dict[str, Key] = {
    # the static audit (and the dynamic one)
    "precision": Key(each(format_name), False),
    "lr": Key(each(lr), False),
    "rules": Key(rules, False),
    "no_rules": Key(boolean, False),
    "fail_on": Key(_checker(choice, allowed=FAIL_ON), False),
    "device": Key(_checker(text, what="a device name (auto, cpu, cuda, cuda:N)"), False),
    "spectral": Key(boolean, False),
    "jobs": Key(_checker(integer, lo=1, hi=MAX_JOBS), False),
    "calib": Key(_checker(text, what="a calibration file path"), False),
    # static rules read it too: whether sub-ULP steps accumulate decides if "cannot move" applies
    "master_weights": Key(each(_checker(choice, allowed=MASTER_WEIGHTS)), False),
    "rounding": Key(each(_checker(choice, allowed=ROUNDINGS)), False),
    # the dynamic audit only
    "val": Key(_checker(text, what="a held-out batch file path"), True),
    "model": Key(_checker(text, what="module:factory or path/to/file.py:factory"), True),
    "loss": Key(_checker(text, what="a loss name or module:function"), True),
    "act_precision": Key(each(act_format), True),
    "rank": Key(each(rank), True),
    "targets": Key(targets, True),
    "alpha": Key(alpha, True),
    "rslora": Key(boolean, True),
    "rank_pattern": Key(rank_pattern, True),
    "sparsity": Key(each(sparsity), True),
    "optimizer": Key(each(_checker(choice, allowed=OPTIMIZERS)), True),
    "steps": Key(limited(MAX_STEPS_ENV, MAX_STEPS_DEFAULT), True),
    "samples": Key(limited(MAX_SAMPLES_ENV, MAX_SAMPLES_DEFAULT), True),
    "p_every": Key(lambda v, w: integer(v, w, 0, env_int(MAX_STEPS_ENV, MAX_STEPS_DEFAULT), MAX_STEPS_ENV), True),
    "sigma": Key(_checker(number, lo=0.0, strict=False, hi=MAX_SIGMA), True),
    "micro_batch": Key(limited(MAX_BATCH_ENV, MAX_BATCH_DEFAULT), True),
    "eval_batch": Key(limited(MAX_BATCH_ENV, MAX_BATCH_DEFAULT), True),
    "seed": Key(_checker(integer, lo=0, hi=MAX_SEED), True),
    "per_layer_p": Key(boolean, True),
    "no_early_stop": Key(boolean, True),
    "max_length": Key(limited(MAX_LENGTH_ENV, MAX_LENGTH_DEFAULT), True),
    # the planned run the forecast looks ahead to, and how the probe models the frameworks
    "train_steps": Key(_checker(integer, lo=1, hi=MAX_TRAIN_STEPS), True),
    "schedule": Key(_checker(choice, allowed=SCHEDULES), True),
    "warmup": Key(_checker(integer, lo=0, hi=MAX_TRAIN_STEPS), True),
    "lr_min": Key(_checker(number, lo=0.0, strict=False), True),
    "lora_base": Key(_checker(choice, allowed=LORA_BASES), True),
    "quantize": Key(_checker(choice, allowed=QUANTIZE_SCOPES), False),  # static rules read its scope too
    "adapter_precision": Key(format_name, True),
    # a model larger than one device (hallway_audit/model/placement.py)
    "device_map": Key(lambda v, w: _placement().device_map_value(v, w), True),
    "max_memory": Key(lambda v, w: _placement().max_memory_value(v, w), True),
}


def _placement() -> ModuleType:
    """model.placement, imported when its keys are used (it brings the model package)."""
    from ..model import placement

    return placement


def canonical_key(key: object, source: str) -> str:
    """A plan key as written (dashes or underscores) -> its canonical name, or a UsageError."""
    if not isinstance(key, str):
        raise UsageError(f"{source}: plan keys are strings, got {show(key)}")
    name = key.strip().replace("-", "_")
    if name not in KEYS:
        from difflib import get_close_matches

        close = get_close_matches(name, KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{source}: unknown plan key {show(key)}{hint} (known: {', '.join(sorted(KEYS))})")
    return name


def check_value(key: str, value: object, where: str) -> object:
    """The canonical value of plan key `key`, or a UsageError naming `where`."""
    return KEYS[key].check(value, where)
