"""RMSNorm as the model calls it: Triton on CUDA, the reference elsewhere (see dispatch.py)."""

from __future__ import annotations

import torch

from instar.kernels.dispatch import announce_fallback, kernel_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernel_backend(x.is_cuda) == "triton":
        from instar.kernels.rmsnorm import triton as fast

        if x.shape[-1] <= fast.MAX_COLS:
            return fast.rms_norm(x, weight, eps)
        announce_fallback("rmsnorm", f"hidden size {x.shape[-1]} > {fast.MAX_COLS} (one row per tile)")
    from instar.kernels.rmsnorm import reference

    return reference.rms_norm(x, weight, eps)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for HF's `LlamaRMSNorm` (same `weight` parameter and state-dict key)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
