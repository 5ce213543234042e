"""User code named on the command line: `package.module:attr` or `path/to/file.py:attr`.

Shared by --model (a factory returning an nn.Module) and --loss (a function).
A file is loaded under a private module name with its directory on sys.path
only while it executes (so it may import its siblings), leaving the user's
import path as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hallway_audit.errors import HallwayError, ModelError, UsageError

from ..checkpoint import open_checkpoint
from ..checkpoint.base import one_line
from ..limits import is_out_of_memory
from .loaded import LoadedModel, finish
from .state import load_strict


def parse_spec(spec: str, option: str, what: str) -> tuple[str, str]:
    """Split 'module:attr' / 'file.py:attr' at the last colon (a Windows drive keeps its own)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise UsageError(
            f"{option} {spec!r}: expected package.module:{what} or path/to/file.py:{what}"
        )
    return target, attr


def _load_file(path: Path, spec: str, option: str, error: type[HallwayError]) -> ModuleType:
    if not path.is_file():
        raise error(f"{option} {spec!r}: no such file {str(path)!r}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_hallway_user_{path.stem}_{digest}"
    if name in sys.modules:  # the same file named twice (--model and --loss): one module
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{option} {spec!r}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    directory = str(path.resolve().parent)
    sys.path.insert(0, directory)
    # no __pycache__ beside the user's file: the audit leaves what it was given as it was
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, Exception):
            raise error(f"{option} {spec!r}: importing {path} failed: {type(exc).__name__}: {one_line(exc)}") from exc
        raise
    finally:
        sys.dont_write_bytecode = writes_bytecode
        with contextlib.suppress(ValueError):  # the user's code removed it itself
            sys.path.remove(directory)
    return module


def _import(target: str, spec: str, option: str, error: type[HallwayError]) -> ModuleType:
    if target.endswith(".py") or os.sep in target or "/" in target:
        return _load_file(Path(target), spec, option, error)
    try:
        return importlib.import_module(target)
    except Exception as exc:  # ModuleNotFoundError, or the module's own code failing
        raise error(
            f"{option} {spec!r}: cannot import {target!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc


def import_object(
    spec: str, *, option: str, what: str, error: type[HallwayError] = UsageError
) -> Any:
    """The object `spec` names; `error` is the class raised when it cannot be found."""
    target, attr = parse_spec(spec, option, what)
    obj: Any = _import(target, spec, option, error)
    missing = object()
    for part in attr.split("."):
        obj = getattr(obj, part, missing)
        if obj is missing:
            raise error(f"{option} {spec!r}: {target!r} has no attribute {attr!r}")
    if not callable(obj):
        raise error(f"{option} {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def build_factory_model(
    checkpoint: str | os.PathLike[str], spec: str, device: str | torch.device
) -> LoadedModel:
    """factory() -> nn.Module, then the checkpoint loaded into it strictly."""
    factory = import_object(spec, option="--model", what="factory", error=ModelError)
    try:
        module = factory()
    except HallwayError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):  # torch's CPU allocator raises a plain RuntimeError: exit 6, not 7
            raise
        raise ModelError(
            f"--model {spec!r}: the factory raised {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelError(
            f"--model {spec!r} returned a {type(module).__name__}, not a torch.nn.Module"
        )
    module.float()  # load straight into float32: no second copy in the stored dtype
    with open_checkpoint(checkpoint) as ckpt:
        load_strict(module, ckpt)
    return finish(module, kind="factory", source=f"factory {spec}", device=device)
