"""The specification of one Collage AdamW step (Yu et al., ICML 2024), per element, in plain torch.

Weights are a multi-component float (MCF): the unevaluated sum hi + lo of two bf16 numbers
(`hi` is the model's parameter, `lo` lives in the optimizer state). Collage-plus stores Adam's
second moment as an MCF too; Collage-light keeps it a plain bf16 tensor.

Arithmetic: every value is held in fp32 and `rn` rounds it to the nearest bf16 (ties to even)
wherever the algorithm works in bf16. An fp32 operation on bf16 inputs followed by `rn` is the
correctly rounded bf16 operation (fp32 has more than 2·8+2 significand bits, so the double
rounding is harmless), so TwoSum and Grow below are the bf16 error-free transformations. The
Triton kernel (triton.py) performs the same operations in the same order and must agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BF16 = torch.bfloat16
F32 = torch.float32


def rn(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest bf16 value (ties to even), still held as fp32."""
    return x.to(BF16).to(F32)


def f32(x: float) -> float:
    """A Python float rounded to fp32, so torch and Triton see the very same scalar."""
    return float(torch.tensor(x, dtype=F32))


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-free bf16 sum: s = bf16(a + b) and e with s + e == a + b exactly, whatever |a|, |b|."""
    s = rn(a + b)
    a1 = rn(s - b)
    b1 = rn(s - a1)
    e = rn(rn(a - a1) + rn(b - b1))
    return s, e


def grow(hi: torch.Tensor, lo: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) + u for a bf16 update u, renormalised so that |lo| <= half an ulp of hi."""
    s, e = two_sum(hi, u)
    r = rn(lo + e)
    new_hi = rn(s + r)
    return new_hi, rn(r - rn(new_hi - s))


def split(beta: float) -> tuple[float, float]:
    """β as two bf16 parts β_hi + β_lo (bf16(0.999) is 1.0: β_lo carries the decay)."""
    hi = float(torch.tensor(beta, dtype=torch.float64).to(BF16))
    return hi, float(torch.tensor(beta - hi, dtype=torch.float64).to(BF16))


def mul(hi: torch.Tensor, lo: torch.Tensor, b_hi: float, b_lo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) · (b_hi + b_lo), the corrected two-part multiply.

    The product p and its error e are taken from the *old* hi. (The released Collage code computes
    p in place into hi and then renormalises against that same tensor, so r is counted twice and v
    decays far too fast.) hi·b_hi is exact in fp32 for bf16 inputs, so e is exact.
    """
    prod = hi * b_hi
    p = rn(prod)
    e = prod - p
    r = rn((lo * b_hi + hi * b_lo) + e)
    new_hi = rn(p + r)  # Fast2Sum: |p| >= |r|
    return new_hi, rn(r - rn(new_hi - p))


@dataclass(frozen=True)
class StepScalars:
    """The per-step scalars of one AdamW step, rounded to fp32 once, on the host."""

    beta1: float
    one_minus_beta1: float
    beta2: float  # light: v is multiplied by this fp32 value
    beta2_hi: float  # plus: the two bf16 parts of β2
    beta2_lo: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - β1^t)
    inv_bias2_sqrt: float  # 1 / sqrt(1 - β2^t): a multiply, where torch's AdamW divides (~1 ulp apart)
    decay: float  # lr · weight_decay


def step_scalars(lr: float, betas: tuple[float, float], eps: float, weight_decay: float, t: int) -> StepScalars:
    """Scalars for step number t (1-based), computed in fp64 and rounded to fp32."""
    b1, b2 = betas
    b2_hi, b2_lo = split(b2)
    return StepScalars(beta1=f32(b1), one_minus_beta1=f32(1 - b1), beta2=f32(b2), beta2_hi=b2_hi, beta2_lo=b2_lo,
                       one_minus_beta2=f32(1 - b2), eps=f32(eps), step_size=f32(lr / (1 - b1**t)),
                       inv_bias2_sqrt=f32(1 / math.sqrt(1 - b2**t)), decay=f32(lr * weight_decay))


def collage_step_(hi: torch.Tensor, lo: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  v_lo: torch.Tensor | None, c: StepScalars) -> torch.Tensor:
    """One AdamW step on bf16 tensors of one shape, in place; `v_lo` given = Collage-plus.

    Returns fp32 [⟨d, u⟩, ⟨u, u⟩, lost, moved] where u is the intended update, d the change of
    hi + lo, `lost` counts elements with u != 0 but d == 0, `moved` those with u != 0.
    """
    g = grad.to(F32)
    w_hi, w_lo = hi.to(F32), lo.to(F32)
    m_new = rn(c.beta1 * m.to(F32) + c.one_minus_beta1 * g)
    g2 = g * g
    if v_lo is None:
        v_new = rn(c.beta2 * v.to(F32) + c.one_minus_beta2 * g2)
    else:
        v_new, v_lo_new = mul(v.to(F32), v_lo.to(F32), c.beta2_hi, c.beta2_lo)
        v_new, v_lo_new = grow(v_new, v_lo_new, rn(c.one_minus_beta2 * g2))
        v_lo.copy_(v_lo_new)
    denom = torch.sqrt(v_new) * c.inv_bias2_sqrt + c.eps
    u = rn(-((c.step_size * m_new) / denom) - c.decay * w_hi)
    new_hi, new_lo = grow(w_hi, w_lo, u)
    d = (new_hi - w_hi) + (new_lo - w_lo)
    moved = u != 0
    stats = torch.stack([(d * u).sum(), (u * u).sum(), (moved & (d == 0)).sum().to(F32), moved.sum().to(F32)])
    m.copy_(m_new)
    v.copy_(v_new)
    hi.copy_(new_hi)
    lo.copy_(new_lo)
    return stats
