"""The one dtype table: how each on-disk format spells a dtype, and its torch dtype.

Kept in one place so the safetensors and ONNX readers cannot disagree about what
a stored tensor is, and so adding a dtype is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """One stored dtype: its torch dtype, bytes per element and on-disk spellings."""

    torch: torch.dtype
    itemsize: int
    safetensors: str | None  # the header's "dtype" string
    onnx: int | None  # onnx.TensorProto.DataType value


def _row(
    torch_name: str, itemsize: int, safetensors: str | None, onnx: int | None
) -> DType | None:
    # float8 variants appeared across torch releases; a missing one is simply unsupported.
    dtype = getattr(torch, torch_name, None)
    return DType(dtype, itemsize, safetensors, onnx) if dtype is not None else None


# ONNX codes are TensorProto.DataType values (spelled out so importing this table
# does not import onnx). Sub-byte packed types (F4, F6_*, INT4, UINT4, INT2, ...)
# are absent on purpose: their stored shape and torch's shape disagree, so they
# would miscount parameters; they are reported as unsupported instead.
_ROWS = [
    _row("float64", 8, "F64", 11),
    _row("float32", 4, "F32", 1),
    _row("float16", 2, "F16", 10),
    _row("bfloat16", 2, "BF16", 16),
    _row("float8_e4m3fn", 1, "F8_E4M3", 17),
    _row("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", 18),
    _row("float8_e5m2", 1, "F8_E5M2", 19),
    _row("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", 20),
    _row("float8_e8m0fnu", 1, "F8_E8M0", 24),
    _row("int64", 8, "I64", 7),
    _row("int32", 4, "I32", 6),
    _row("int16", 2, "I16", 5),
    _row("int8", 1, "I8", 3),
    _row("uint64", 8, "U64", 13),
    _row("uint32", 4, "U32", 12),
    _row("uint16", 2, "U16", 4),
    _row("uint8", 1, "U8", 2),
    _row("bool", 1, "BOOL", 9),
    _row("complex64", 8, "C64", 14),
    _row("complex128", 16, None, 15),
]
DTYPES: tuple[DType, ...] = tuple(r for r in _ROWS if r is not None)

_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES if d.safetensors is not None}
_BY_ONNX = {d.onnx: d for d in DTYPES if d.onnx is not None}


def from_safetensors(code: str) -> DType | None:
    """The row for a safetensors header dtype string, or None if unsupported."""
    return _BY_SAFETENSORS.get(code)


def from_onnx(code: int) -> DType | None:
    """The row for an ONNX TensorProto data type, or None if unsupported."""
    return _BY_ONNX.get(code)


def onnx_name(code: int) -> str:
    """A readable name for an ONNX data type code, for error messages."""
    try:
        import onnx

        return str(onnx.TensorProto.DataType.Name(code))
    except Exception:  # unknown code or onnx missing: the number is still useful
        return str(code)
