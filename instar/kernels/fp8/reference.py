"""The specification of FP8 tensorwise quantisation, in plain torch.

    amax  = max |x|                      (NaN if x holds a NaN)
    scale = fp8_max / amax, except: amax 0, inf or NaN -> 1; a scale that overflows fp32 -> fp32 max
            (TransformerEngine's `compute_scale_from_amax`)
    x8    = cast(clamp(x · scale, −fp8_max, fp8_max))   (saturating; NaN stays NaN)
    x ≈ x8 · scale_inv,  scale_inv = 1 / scale  (what `torch._scaled_mm` takes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn  # forward: weights and activations
E5M2 = torch.float8_e5m2  # backward: gradients (wider range)


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


@dataclass
class Fp8Tensor:
    data: torch.Tensor  # fp8, same shape as the input
    data_t: torch.Tensor | None  # fp8, the transpose made contiguous (what a backward GEMM needs), or None
    scale_inv: torch.Tensor  # fp32 scalar: x ≈ data · scale_inv
    amax: torch.Tensor  # fp32 scalar: max |x| of this tensor (for delayed scaling's history)


def amax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().max().float()


def scale_from_amax(amax_value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = fp8_max(dtype)
    scale = fmax / amax_value
    scale = torch.where(torch.isinf(scale), torch.finfo(torch.float32).max, scale)
    keep_one = (amax_value == 0) | torch.isinf(amax_value) | torch.isnan(amax_value)
    return torch.where(keep_one, torch.ones_like(scale), scale)


def quantize(x: torch.Tensor, dtype: torch.dtype, transpose: bool = False,
             scale_amax: torch.Tensor | None = None) -> Fp8Tensor:
    """`x` (2-D) in FP8 `dtype`, scaled from its own amax, or from `scale_amax` when that is given
    and > 0 (delayed scaling passes the largest amax of its history: 0 while it is empty)."""
    current = amax(x)
    source = current if scale_amax is None else torch.where(scale_amax > 0, scale_amax.float(), current)
    scale = scale_from_amax(source, dtype)
    fmax = fp8_max(dtype)
    data = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return Fp8Tensor(data, data.t().contiguous() if transpose else None, scale.reciprocal(), current)
