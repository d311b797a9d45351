"""Fused RMSNorm in Triton: one pass forward (keeping 1/rms per row), one pass backward.

Forward stores y and rstd = 1/sqrt(mean(x²)+eps) (fp32). Backward, with x̂ = x·rstd and g = dy·w:
dx = rstd·(g − x̂·mean(g·x̂)), dw = Σ_rows dy·x̂ (partial sums per program, added in torch).
Rows up to MAX_COLS wide are supported; the dispatcher (op.py) announces a fallback otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from instar.kernels.triton_utils import interpreted, round_to_bf16, to_output

MAX_COLS = 65536


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, n_rows, n_cols, eps, stride_x, stride_y,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, X_BF16: tl.constexpr, X_FP16: tl.constexpr,
                 Y_BF16: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = x * rstd[:, None]
    # HF rounds the normalised value to the input dtype before the weight multiplies it.
    if X_BF16:
        xhat = round_to_bf16(xhat)
    if X_FP16:
        xhat = xhat.to(tl.float16).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = to_output(xhat * w[None, :], Y_BF16)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, X_BF16: tl.constexpr, X_FP16: tl.constexpr,
                 DX_BF16: tl.constexpr):
    # A persistent grid: program p takes row blocks p, p + G, p + 2G, ... and keeps its dw sum
    # in registers, so the partial-dw buffer has G rows, not one per row block.
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * ROWS, n_rows, n_prog * ROWS):
        rows = start + tl.arange(0, ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = to_output(rstd[:, None] * (g - xhat * c[:, None]), DX_BF16)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if X_BF16:
            xhat = round_to_bf16(xhat)
        if X_FP16:
            xhat = xhat.to(tl.float16).to(tl.float32)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=cmask)


def _layout(n_cols: int) -> tuple[int, int, int]:
    """(rows per program, block width, warps): big tiles under the interpreter, which pays per
    program instance; about 8K elements per program on GPU."""
    block_n = triton.next_power_of_2(n_cols)
    budget = 65536 if interpreted() else 8192
    rows = max(1, min(64, budget // block_n))
    warps = 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16
    return rows, block_n, warps


def _flags(x: torch.Tensor) -> dict:
    return {"X_BF16": x.dtype == torch.bfloat16, "X_FP16": x.dtype == torch.float16}


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rows, block_n, warps = _layout(n_cols)
        _rmsnorm_fwd[(triton.cdiv(n_rows, rows),)](
            x2, weight, y, rstd, n_rows, n_cols, eps, x2.stride(0), y.stride(0),
            ROWS=rows, BLOCK_N=block_n, Y_BF16=out_dtype == torch.bfloat16, num_warps=warps, **_flags(x2))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        rows, block_n, warps = _layout(n_cols)
        blocks = triton.cdiv(n_rows, rows)
        if x2.is_cuda and not interpreted():
            blocks = min(blocks, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        dw_part = torch.empty((blocks, n_cols), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd[(blocks,)](
            dy2, x2, weight, rstd, dx, dw_part, n_rows, n_cols, dy2.stride(0), x2.stride(0), dx.stride(0),
            ROWS=rows, BLOCK_N=block_n, DX_BF16=dx.dtype == torch.bfloat16, num_warps=warps, **_flags(x2))
        dw = dw_part.sum(0).to(weight.dtype)
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)
