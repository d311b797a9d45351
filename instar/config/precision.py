"""What each `precision:` means, in one place: how parameters are held, what the forward computes
in, and what the optimizer and the module swaps do. Engines, the optimizer factory, the DeepSpeed
config, the frozen reference and the swaps ask the policy instead of comparing names (torch is
imported only by the dtype properties: the config layer stays torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    bf16_params: bool = False  # parameters (and AdamW state) in bf16 with no fp32 copy
    collage: str | None = None  # the Collage variant keeping the bits bf16 updates lose (light / plus)
    autocast: bool = False  # fp32 weights and gradients, the forward under bf16 autocast
    fp8: bool = False  # eligible linears compute in FP8 (under bf16 autocast)

    @property
    def param_dtype(self) -> "torch.dtype":
        import torch

        return torch.bfloat16 if self.bf16_params else torch.float32

    @property
    def compute_dtype(self) -> "torch.dtype":
        """What the forward computes in: bf16 for every precision but fp32."""
        import torch

        return torch.float32 if self.name == "fp32" else torch.bfloat16


POLICIES = {p.name: p for p in (
    PrecisionPolicy("fp32"),
    PrecisionPolicy("bf16", autocast=True),
    PrecisionPolicy("bf16-pure", bf16_params=True),
    PrecisionPolicy("collage-light", bf16_params=True, collage="light"),
    PrecisionPolicy("collage-plus", bf16_params=True, collage="plus"),
    PrecisionPolicy("fp8", autocast=True, fp8=True),
)}


def precision_policy(name: str) -> PrecisionPolicy:
    return POLICIES[name]
