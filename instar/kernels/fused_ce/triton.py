"""The per-chunk cross-entropy step in Triton (same contract as reference.py).

One program per row, two passes over the vocabulary in blocks: an online log-sum-exp (running
max and rescaled sum, so no row is ever held whole), then softmax − onehot written over the
logits. The matmuls around it stay in torch (cuBLAS), as in Liger-Kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from instar.kernels.triton_utils import interpreted, to_output


@triton.jit
def _ce_grad_kernel(LOGITS, TARGETS, LOSSES, n_cols, stride, ignore_index,
                    BLOCK_V: tl.constexpr, IS_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    safe = tl.where(valid, target, 0)

    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    z_target = tl.load(ptr + safe).to(tl.float32)
    tl.store(LOSSES + row, tl.where(valid, lse - z_target, 0.0))

    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == safe, 1.0, 0.0)
        grad = to_output(tl.where(valid, grad, 0.0), IS_BF16)
        tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    assert logits.ndim == 2 and logits.stride(1) == 1, "rows of logits must be contiguous"
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    block = min(triton.next_power_of_2(vocab), 65536 if interpreted() else 32768)
    _ce_grad_kernel[(rows,)](logits, targets.contiguous(), losses, vocab, logits.stride(0), ignore_index,
                             BLOCK_V=block, IS_BF16=logits.dtype == torch.bfloat16,
                             num_warps=32 if block >= 8192 else 8)
    return losses
