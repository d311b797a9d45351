"""The specification: HF `LlamaRMSNorm`'s arithmetic in plain torch.

y = weight * (x * rsqrt(mean(x², last dim) + eps)).to(x.dtype), the mean taken in fp32. The
normalised value is rounded to the input dtype before the weight multiplies it (as HF does), so
bf16 inputs give HF's bf16 rounding; the result dtype is torch's promotion of weight and input.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
