"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreted() -> bool:
    """True under Triton's CPU interpreter (tests): no autotuning, no GPU-only tricks."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Decided once, when the kernels are defined (the interpreter is chosen before triton is imported).
_HARDWARE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still held as fp32.

    On GPU the hardware conversion (one cvt.rn.bf16.f32); under the interpreter, which truncates
    there, the same rounding done on the bits (4 integer ops: in the Collage kernel they were ~30 %
    of the SASS). Storing a value that is already a bf16 is then exact either way.
    """
    if _HARDWARE_BF16_ROUNDING:
        return x.to(tl.bfloat16).to(tl.float32)
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_output(x, IS_BF16: tl.constexpr):
    """fp32 value ready to store into an output of dtype bf16 (IS_BF16) or fp32/fp16."""
    if IS_BF16:
        x = round_to_bf16(x)
    return x
