"""The built-in formats, one registry entry each (order = list_formats() order)."""

from __future__ import annotations

from hallway_audit.lattice.floats import FloatFormat
from hallway_audit.lattice.integer import IntFormat
from hallway_audit.lattice.mx import MXFormat, NVFP4Format
from hallway_audit.lattice.nf4 import NF4Format
from hallway_audit.lattice.registry import register
from hallway_audit.lattice.scaled import LastDimBlocks, PerChannel

FP32 = register(FloatFormat("fp32", 8, 23, "ieee", "IEEE binary32"), "float32", "f32", "float")
BF16 = register(FloatFormat("bf16", 8, 7, "ieee", "bfloat16: fp32 range, 8-bit significand"), "bfloat16")
FP16 = register(FloatFormat("fp16", 5, 10, "ieee", "IEEE binary16"), "float16", "half")
FP8_E4M3 = register(
    FloatFormat("fp8_e4m3", 4, 3, "fn", "OCP FP8 E4M3FN: no inf, max 448"),
    "e4m3", "e4m3fn", "fp8_e4m3fn", "float8_e4m3fn", "fp8",
)
FP8_E5M2 = register(
    FloatFormat("fp8_e5m2", 5, 2, "ieee", "OCP FP8 E5M2: IEEE-like with inf, max 57344"),
    "e5m2", "float8_e5m2",
)
FP6_E3M2 = register(
    FloatFormat("fp6_e3m2", 3, 2, "finite", "OCP MX FP6 E3M2: no inf/NaN, max 28"),
    "e3m2", "float6_e3m2fn",
)
FP6_E2M3 = register(
    FloatFormat("fp6_e2m3", 2, 3, "finite", "OCP MX FP6 E2M3: no inf/NaN, max 7.5"),
    "e2m3", "float6_e2m3fn",
)
FP4_E2M1 = register(
    FloatFormat("fp4_e2m1", 2, 1, "finite", "OCP MX FP4 E2M1: no inf/NaN, max 6"),
    "e2m1", "float4_e2m1fn", "fp4",
)
register(IntFormat("int8", 8, PerChannel(), None, "per-channel fp32",
                   "symmetric int8, levels -127..127, absmax scale per output channel (dim 0)"))
register(IntFormat("int4", 4, LastDimBlocks(128), 128, "group fp32",
                   "symmetric int4, levels -7..7, absmax scale per group of 128 (last dim)"))
register(NF4Format(64), "normalfloat4")
register(MXFormat("mxfp8", FP8_E4M3, 32), "mxfp8_e4m3")
register(MXFormat("mxfp6", FP6_E2M3, 32), "mxfp6_e2m3")
register(MXFormat("mxfp4", FP4_E2M1, 32), "mxfp4_e2m1")
register(NVFP4Format(FP4_E2M1, FP8_E4M3, 16))
