"""FP8 tensorwise quantisation in Triton (same contract as reference.py): two kernels.

1. amax: each program reduces a block of |x| and `atomic_max`es it into one int32. Non-negative
   floats order like their bit patterns, and a NaN's bits exceed inf's, so a NaN wins the max
   without a special case.
2. cast: each program loads the amax, computes the scale (TransformerEngine's rules), and writes
   its tile of clamp(x·scale) in FP8, and optionally the transposed tile into the transposed copy
   that the backward GEMMs need (so no separate transpose pass). Program 0 writes scale_inv.

Both read the amax from device memory: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from instar.kernels.fp8.reference import Fp8Tensor, fp8_max
from instar.kernels.triton_utils import interpreted

FP32_MAX = tl.constexpr(3.4028234663852886e38)  # a Triton global must be a constexpr (the interpreter does not check)


@triton.jit
def _amax_kernel(X, AMAX_BITS, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| as bits
    tl.atomic_max(AMAX_BITS, tl.max(bits, axis=0))


@triton.jit
def _cast_kernel(X, Y, YT, AMAX, HISTORY_AMAX, SCALE_INV, M, N, stride_xm, FMAX: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, TRANSPOSE: tl.constexpr, DELAYED: tl.constexpr):
    amax = tl.load(AMAX)
    if DELAYED:
        history = tl.load(HISTORY_AMAX)
        amax = tl.where(history > 0.0, history, amax)
    keep_one = (amax == 0.0) | (amax == float("inf")) | (amax != amax)
    scale = tl.div_rn(tl.full((), FMAX, tl.float32), tl.where(keep_one, 1.0, amax))  # IEEE division, as TE
    scale = tl.where(scale == float("inf"), FP32_MAX, scale)
    scale = tl.where(keep_one, 1.0, scale)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(SCALE_INV, tl.div_rn(tl.full((), 1.0, tl.float32), scale))
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * scale
    # Saturate, keeping NaN (min/max on GPU would turn a NaN into the bound).
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FMAX), FMAX))
    y = y.to(Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * N + cols[None, :], y, mask=mask)
    if TRANSPOSE:
        tl.store(YT + cols[None, :] * M + rows[:, None], y, mask=mask)


def quantize(x: torch.Tensor, dtype: torch.dtype, transpose: bool = False,
             scale_amax: torch.Tensor | None = None) -> Fp8Tensor:
    assert x.ndim == 2 and x.stride(1) == 1, "quantize takes a 2-D tensor with contiguous rows"
    m, n = x.shape
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    block = 65536 if interpreted() else 4096
    if x.numel():
        xc = x if x.is_contiguous() else x.contiguous()
        _amax_kernel[(triton.cdiv(x.numel(), block),)](xc, amax_bits, x.numel(), BLOCK=block, num_warps=8)
    current = amax_bits.view(torch.float32)
    history = current if scale_amax is None else scale_amax.reshape(1).float()
    data = torch.empty((m, n), dtype=dtype, device=x.device)
    data_t = torch.empty((n, m), dtype=dtype, device=x.device) if transpose else None
    # The cast kernel's first program writes it; only an empty tensor keeps the fill (saves a launch).
    scale_inv = (torch.empty if x.numel() else torch.ones)(1, dtype=torch.float32, device=x.device)
    bm, bn = (256, 256) if interpreted() else (64, 64)
    if x.numel():
        _cast_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x, data, data_t if transpose else data, current, history, scale_inv, m, n, x.stride(0),
            FMAX=fp8_max(dtype), BM=bm, BN=bn, TRANSPOSE=transpose, DELAYED=scale_amax is not None, num_warps=8)
    return Fp8Tensor(data, data_t, scale_inv.reshape(()), current.reshape(()))
