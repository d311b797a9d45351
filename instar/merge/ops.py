"""Weight-space merges of models that share a base.

State dicts map parameter names to tensors; every input must have the same names and shapes.
Arithmetic runs in float64 and is cast back to each tensor's dtype.
"""

from __future__ import annotations

import torch

from instar.errors import ContractError


def check_compatible(states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Raise ContractError unless every state dict has the same keys and shapes."""
    (first, ref), *rest = states.items()
    for name, state in rest:
        if state.keys() != ref.keys():
            diff = sorted(set(state) ^ set(ref))[:5]
            raise ContractError(f"cannot merge '{first}' and '{name}': different parameters (e.g. {diff}); "
                                f"merged models must share one architecture and base")
        for key, tensor in state.items():
            if tensor.shape != ref[key].shape:
                raise ContractError(f"cannot merge '{first}' and '{name}': {key} has shape "
                                    f"{tuple(ref[key].shape)} vs {tuple(tensor.shape)}")


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i with weights normalised to sum 1 (uniform when None)."""
    weights = weights or [1.0] * len(states)
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        acc = sum(w / total * s[key].double() for w, s in zip(weights, states))
        out[key] = acc.to(ref.dtype)
    return out


def task_arithmetic(base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """θ₀ + λ Σ (θ_i − θ₀): add each model's task vector to the base (Ilharco et al., 2023)."""
    out = {}
    for key, ref in base.items():
        b = ref.double()
        acc = b + scale * sum(s[key].double() - b for s in states)
        out[key] = acc.to(ref.dtype)
    return out
