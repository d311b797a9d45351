"""FP8 quantisation as the FP8 linear calls it: Triton on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from instar.kernels.dispatch import kernel_backend
from instar.kernels.fp8.reference import Fp8Tensor


def quantize(x: torch.Tensor, dtype: torch.dtype, transpose: bool = False,
             scale_amax: torch.Tensor | None = None) -> Fp8Tensor:
    if kernel_backend(x.is_cuda) == "triton":
        from instar.kernels.fp8 import triton as impl
    else:
        from instar.kernels.fp8 import reference as impl
    return impl.quantize(x, dtype, transpose, scale_amax)
