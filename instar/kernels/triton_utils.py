"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreted() -> bool:
    """True under Triton's CPU interpreter (tests): no autotuning, no GPU-only tricks."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still held as fp32.

    A plain `.to(tl.bfloat16)` rounds correctly on GPU but truncates under the interpreter;
    storing a value that is already a bf16 makes both exact.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_output(x, IS_BF16: tl.constexpr):
    """fp32 value ready to store into an output of dtype bf16 (IS_BF16) or fp32/fp16."""
    if IS_BF16:
        x = round_to_bf16(x)
    return x
