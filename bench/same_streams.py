"""The Collage step's memory traffic without its arithmetic, for bench/collage_bandwidth.py.

It reads grad, hi, lo, m, v (+ v_lo) and writes hi, lo, m, v (+ v_lo) as `x + grad`, in place,
with the step's launch. Its bandwidth is the ceiling for this access pattern (9 or 11 streams),
which a plain copy (2 streams) overstates; the step's share of it is what its math costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_in_place(ptr, offs, mask, g):  # fp32 math: the interpreter's bf16 add is unreliable
    tl.store(ptr + offs, (tl.load(ptr + offs, mask=mask).to(tl.float32) + g).to(tl.bfloat16), mask=mask)


@triton.jit
def _same_streams(hi_ptr, lo_ptr, g_ptr, m_ptr, v_ptr, vlo_ptr, n, PLUS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    _add_in_place(hi_ptr, offs, mask, g)
    _add_in_place(lo_ptr, offs, mask, g)
    _add_in_place(m_ptr, offs, mask, g)
    _add_in_place(v_ptr, offs, mask, g)
    if PLUS:
        _add_in_place(vlo_ptr, offs, mask, g)


def same_streams_(hi: torch.Tensor, lo: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  v_lo: torch.Tensor | None, block: int, num_warps: int) -> None:
    n = hi.numel()
    _same_streams[(triton.cdiv(n, block),)](hi, lo, grad, m, v, v if v_lo is None else v_lo, n,
                                            PLUS=v_lo is not None, BLOCK=block, num_warps=num_warps)
