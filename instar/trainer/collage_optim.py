"""Collage AdamW: bf16 parameters, no fp32 copy anywhere (Yu et al., ICML 2024).

Each parameter `p` is the high part of a two-bf16 weight p + lo; `lo`, Adam's m and v (and, for
Collage-plus, v's low part) are bf16 state. The whole step is one elementwise kernel
(instar/kernels/collage), so the optimizer works on any tensor shape — including the flat 1-D
bf16 partitions DeepSpeed ZeRO hands a client optimizer when it keeps no fp32 masters.

Under ZeRO-3 `step()` runs once per sub-group with other params swapped in, so all counters are
per parameter (`state["step"]`, an int that `load_state_dict` leaves alone), and the descent
statistics are accumulated until the engine reads them with `pop_stats()`.
"""

from __future__ import annotations

import torch

from instar.errors import ContractError
from instar.kernels.collage import reference
from instar.kernels.dispatch import kernel_backend

VARIANTS = ("light", "plus")


def _step_fn(on_cuda: bool):
    if kernel_backend(on_cuda) == "triton":
        from instar.kernels.collage import triton as fast

        return fast.collage_step_
    return reference.collage_step_


class CollageAdamW(torch.optim.Optimizer):
    """AdamW on multi-component bf16 weights; `variant="plus"` makes the second moment one too."""

    def __init__(self, params, lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, variant: str = "plus"):
        if variant not in VARIANTS:
            raise ValueError(f"Collage variant {variant!r}: use one of {VARIANTS}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.variant = variant
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.dtype != torch.bfloat16:
                    raise ContractError(
                        f"Collage AdamW got a {p.dtype} parameter (group {g}, "
                        f"#{i}, shape {tuple(p.shape)}): Collage keeps the weights themselves in bf16 "
                        f"(hi + lo) and needs no fp32 copy. Cast the model first (model.to(torch.bfloat16)), "
                        f"or use precision `bf16` (fp32 master weights) if you want fp32 parameters")
        self._stats: torch.Tensor | None = None

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["lo"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if self.variant == "plus":
                state["exp_avg_sq_lo"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:  # e.g. DeepSpeed swapped in fp32 master partitions
                    raise ContractError(
                        f"Collage AdamW was handed a {p.dtype} tensor of {p.numel()} elements to update: it "
                        f"updates bf16 weights in place and never keeps an fp32 copy. Under DeepSpeed this "
                        f"means a config that keeps fp32 masters (bf16 at ZeRO stage 0, or "
                        f"data_types.grad_accum_dtype=fp32); let instar generate the bf16 section")
                if not p.is_contiguous():
                    raise ContractError(f"Collage AdamW needs contiguous parameters (got strides {p.stride()})")
                state = self._state(p)
                state["step"] += 1
                scalars = reference.step_scalars(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                                 state["step"])
                stats = _step_fn(p.is_cuda)(p, state["lo"], p.grad.contiguous(), state["exp_avg"],
                                            state["exp_avg_sq"], state.get("exp_avg_sq_lo"), scalars)
                self._stats = stats if self._stats is None else self._stats + stats
        return loss

    def pop_stats(self) -> torch.Tensor:
        """[⟨d,u⟩, ⟨u,u⟩, lost, moved] summed over every step() since the last call (fp32, CPU)."""
        stats = torch.zeros(4) if self._stats is None else self._stats.float().cpu()
        self._stats = None
        return stats


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state an optimizer holds in this process (its moments, Collage's lo parts;
    under ZeRO only this rank's partition)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1)


def descent_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Effective descent quality ⟨d,u⟩/‖u‖ (the intended update projected on what landed), its
    share ⟨d,u⟩/‖u‖² (1 = every update landed) and the fraction of lost updates."""
    dot, uu, lost, moved = (float(x) for x in stats)
    norm = uu ** 0.5
    return {"collage_edq": dot / norm if norm > 0 else 0.0,
            "collage_edq_share": dot / uu if uu > 0 else 1.0,
            "collage_lost_frac": lost / moved if moved > 0 else 0.0}
