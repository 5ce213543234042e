"""The plan from files: a plan YAML (the CLI's keys, for CI) or a PEFT adapter_config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..errors import UsageError
from .settings import SweepSpec, from_mapping, parse_rank


def load_plan(path: str | Path) -> dict[str, object]:
    """A plan YAML: a mapping of option names (as on the command line) to values or lists."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{p}: plan file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{p}{where}: malformed plan YAML: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read the plan: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a plan is a mapping of option names to values")
    return data


def peft_targets(target_modules: object) -> str:
    """PEFT's target_modules (a list of name suffixes, a regex, or 'all-linear') as --targets."""
    if target_modules is None or target_modules == "all-linear":
        return "all-linear"
    if isinstance(target_modules, str):
        return target_modules  # PEFT: a string is a full-match regex over module names
    names = [re.escape(str(t)) for t in target_modules]
    return rf"(^|\.)({'|'.join(names)})$"


def apply_peft_config(spec: SweepSpec, path: str | Path) -> SweepSpec:
    """r, target_modules, lora_alpha, use_rslora and rank_pattern from adapter_config.json."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{p}: PEFT config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not a valid adapter_config.json: {exc}") from None
    if not isinstance(cfg, dict) or "r" not in cfg:
        raise UsageError(f"{p}: not a LoRA adapter_config.json (no 'r')")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise UsageError(f"{p}: peft_type {kind} is not supported (only LORA)")
    data: dict[str, object] = {"rank": [parse_rank(cfg["r"])], "targets": peft_targets(cfg.get("target_modules"))}
    if cfg.get("lora_alpha") is not None:
        data["alpha"] = float(cfg["lora_alpha"])
    data["rslora"] = bool(cfg.get("use_rslora", False))
    if cfg.get("rank_pattern"):
        data["rank_pattern"] = dict(cfg["rank_pattern"])
    return from_mapping(spec, data, str(p))
