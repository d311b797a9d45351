"""The fused Collage AdamW step: one pass that reads grad, hi, lo, m, v (and v_lo) once and writes
them back once, per element. Same operations in the same order as reference.py (the spec).

On GPU, divisions and the square root use the correctly rounded forms (`div_rn`, `sqrt_rn`) and
the launch disables fp contraction, so no FMA changes a rounding the reference does not make.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from instar.kernels.collage.reference import StepScalars
from instar.kernels.triton_utils import interpreted, round_to_bf16

BLOCK, NUM_WARPS = 1024, 4  # bench/collage_bandwidth.py times the alternatives on a GPU


@triton.jit
def _two_sum(a, b):
    # On sm_90 an fp32 add/sub of bf16 values followed by round_to_bf16 compiles to one native bf16
    # instruction (HADD2/HFMA2.BF16), so the roundings cost nothing. Dropping the four that never
    # change a value (Knuth's 2Sum lemma) made the kernel longer: fp32 ops plus conversions.
    s = round_to_bf16(a + b)
    a1 = round_to_bf16(s - b)
    b1 = round_to_bf16(s - a1)
    e = round_to_bf16(round_to_bf16(a - a1) + round_to_bf16(b - b1))
    return s, e


@triton.jit
def _grow(hi, lo, u):
    s, e = _two_sum(hi, u)
    r = round_to_bf16(lo + e)
    new_hi = round_to_bf16(s + r)
    return new_hi, round_to_bf16(r - round_to_bf16(new_hi - s))


@triton.jit
def _mul(hi, lo, b_hi, b_lo):
    prod = hi * b_hi
    p = round_to_bf16(prod)
    e = prod - p
    r = round_to_bf16((lo * b_hi + hi * b_lo) + e)
    new_hi = round_to_bf16(p + r)
    return new_hi, round_to_bf16(r - round_to_bf16(new_hi - p))


@triton.jit
def _collage_step_kernel(hi_ptr, lo_ptr, g_ptr, m_ptr, v_ptr, vlo_ptr, stats_ptr, n,
                         beta1, one_minus_beta1, beta2, beta2_hi, beta2_lo, one_minus_beta2, eps,
                         step_size, inv_bias2_sqrt, decay,
                         PLUS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w_hi = tl.load(hi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w_lo = tl.load(lo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    m_new = round_to_bf16(beta1 * m + one_minus_beta1 * g)
    g2 = g * g
    if PLUS:
        v_lo = tl.load(vlo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_new, v_lo_new = _mul(v, v_lo, beta2_hi, beta2_lo)
        v_new, v_lo_new = _grow(v_new, v_lo_new, round_to_bf16(one_minus_beta2 * g2))
        tl.store(vlo_ptr + offs, v_lo_new.to(tl.bfloat16), mask=mask)
    else:
        v_new = round_to_bf16(beta2 * v + one_minus_beta2 * g2)
    denom = tl.sqrt_rn(v_new) * inv_bias2_sqrt + eps
    u = round_to_bf16(-tl.div_rn(step_size * m_new, denom) - decay * w_hi)
    new_hi, new_lo = _grow(w_hi, w_lo, u)

    tl.store(m_ptr + offs, m_new.to(tl.bfloat16), mask=mask)
    tl.store(v_ptr + offs, v_new.to(tl.bfloat16), mask=mask)
    tl.store(hi_ptr + offs, new_hi.to(tl.bfloat16), mask=mask)
    tl.store(lo_ptr + offs, new_lo.to(tl.bfloat16), mask=mask)

    # Descent-quality statistics of this block (masked lanes have u == 0 and d == 0). The two counts
    # (each <= BLOCK < 2^15, so the int32 sum cannot overflow) share one reduction: moved + 2^16 * lost.
    d = (new_hi - w_hi) + (new_lo - w_lo)
    moved = u != 0
    counts = tl.sum(moved.to(tl.int32) + ((moved & (d == 0)).to(tl.int32) << 16), axis=0)
    tl.store(stats_ptr + pid * 4 + 0, tl.sum(d * u, axis=0))
    tl.store(stats_ptr + pid * 4 + 1, tl.sum(u * u, axis=0))
    tl.store(stats_ptr + pid * 4 + 2, (counts >> 16).to(tl.float32))
    tl.store(stats_ptr + pid * 4 + 3, (counts & 0xFFFF).to(tl.float32))


def collage_step_(hi: torch.Tensor, lo: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  v_lo: torch.Tensor | None, c: StepScalars, block: int = BLOCK,
                  num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Same contract as reference.collage_step_ (contiguous tensors of one shape)."""
    if block >= 2**15:
        raise ValueError(f"Collage step: BLOCK {block} too large (the per-block counts share one int32, "
                         f"so BLOCK must stay below 32,768)")
    n = hi.numel()
    grid = (triton.cdiv(n, block),)
    stats = torch.empty((grid[0], 4), dtype=torch.float32, device=hi.device)
    plus = v_lo is not None
    extra = {} if interpreted() else {"enable_fp_fusion": False, "num_warps": num_warps}
    _collage_step_kernel[grid](hi, lo, grad, m, v, v_lo if plus else v, stats, n,
                               c.beta1, c.one_minus_beta1, c.beta2, c.beta2_hi, c.beta2_lo, c.one_minus_beta2,
                               c.eps, c.step_size, c.inv_bias2_sqrt, c.decay, PLUS=plus, BLOCK=block, **extra)
    return stats.sum(0)
