"""A SettingResult as plain JSON and back, exactly: how ranks send results to rank 0.

torch.distributed's object collectives pickle, and unpickling runs whatever the bytes
name; nothing in this project unpickles. A result is written as JSON instead: str,
int, float (Python's repr round-trips every double; NaN and +-Infinity as JSON's
common extension), bool, None and lists as themselves, and every JSON object tagged
with what it was -- a tuple, a dict with non-string keys, bytes (base64), a tensor
(dtype, shape and its numbers), a numpy array or scalar, or one of the dataclasses a
SettingResult is made of. Decoding builds only those: the classes are the ones reachable from
SettingResult's type hints, found when the module is first used, so a field added to
the result travels without a change here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import typing
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # imported when used: the sweep imports this package
    from ..probe.result import SettingResult

TAG = "@"


@lru_cache(maxsize=1)
def _classes() -> dict[str, type]:
    """Every dataclass reachable from SettingResult's field types, by qualified name."""
    from ..probe.result import SettingResult

    found: dict[str, type] = {}

    def walk(tp: Any) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            name = _name(tp)
            if name in found:
                return
            found[name] = tp
            for hint in typing.get_type_hints(tp).values():
                walk(hint)

    walk(SettingResult)
    return found


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value: Any) -> Any:
    if value is None or type(value) in (bool, int, float, str):  # subclasses (enums) would not come back
        return value
    if type(value) is list:
        return [_encode(v) for v in value]
    if type(value) is bytes:
        return {TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
    if type(value) is tuple:
        return {TAG: "tuple", "v": [_encode(v) for v in value]}
    if type(value) is dict:
        return {TAG: "dict", "v": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        return {TAG: "tensor", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "v": t.reshape(-1).tolist()}
    if isinstance(value, np.ndarray):
        return {TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape), "v": value.reshape(-1).tolist()}
    if isinstance(value, np.generic):
        return {TAG: "np", "dtype": value.dtype.str, "v": value.item()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        name = _name(cls)
        if _classes().get(name) is not cls:
            raise TypeError(f"cannot send a {name} to rank 0: not part of a SettingResult")
        return {TAG: "dc", "c": name, "f": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot send a {type(value).__name__} to rank 0: not plain data")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag == "bytes":
        return base64.b64decode(str(value["v"]), validate=True)
    if tag == "tuple":
        return tuple(_decode(v) for v in value["v"])
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in value["v"]}
    if tag == "tensor":
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {value['dtype']!r}")
        return torch.tensor(value["v"], dtype=dtype).reshape(value["shape"])
    if tag == "ndarray":
        return np.array(value["v"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if tag == "np":
        return np.dtype(value["dtype"]).type(value["v"])
    if tag == "dc":
        cls = _classes().get(value["c"])
        if cls is None:
            raise ValueError(f"unknown class {value['c']!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        data = {k: _decode(v) for k, v in value["f"].items()}
        if set(data) != set(fields):
            raise ValueError(f"{value['c']}: fields {sorted(data)} do not match {sorted(fields)}")
        obj = cls(**{k: v for k, v in data.items() if fields[k].init})
        for k, v in data.items():
            if not fields[k].init:
                object.__setattr__(obj, k, v)
        return obj
    raise ValueError(f"unknown tag {tag!r}")


def encode(value: Any) -> Any:
    """Plain data (str, int, float, bool, None, bytes, tuples, lists, dicts) as JSON-ready data."""
    return _encode(value)


def decode(data: Any) -> Any:
    """What `encode` wrote; a malformed document is a ValueError."""
    try:
        return _decode(data)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"malformed data: {type(exc).__name__}: {exc}") from exc


def to_plain(result: SettingResult) -> Any:
    """The result as JSON-ready data (see the module docstring)."""
    return _encode(result)


def from_plain(data: Any) -> SettingResult:
    """The result `to_plain` wrote, rebuilt."""
    from ..probe.result import SettingResult

    out = decode(data)
    if not isinstance(out, SettingResult):
        raise ValueError(f"expected a SettingResult, got {type(out).__name__}")
    return out


def dumps(data: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and Infinity kept (Python's json reads them back)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=True, ensure_ascii=False).encode("utf-8")


def loads(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))
