"""KTO's losses by name (the `kto` kind's `loss:`): per-completion losses from the completions'
policy/reference log-ratios r, the step's KL estimate z and their labels (formulas: the kto kind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from instar.registry import Registry


@dataclass(frozen=True)
class KtoLoss:
    fn: Callable  # (log-ratios r [n], KL estimate z, desirable [n] bool, spec) -> per-completion losses [n]
    uses_kl: bool  # whether it reads z (else the mismatched completions are never run)

    def __call__(self, r, z, desirable, spec):
        return self.fn(r, z, desirable, spec)


KTO_LOSSES: Registry[KtoLoss] = Registry("KTO loss")


def kto_loss(name: str, uses_kl: bool):
    """Register `fn(r, z, desirable, spec)` as the KTO loss `name`."""
    def add(fn):
        KTO_LOSSES.register(name)(KtoLoss(fn, uses_kl))
        return fn

    return add


@kto_loss("kto", uses_kl=True)
def _kto(r, z, desirable, spec):
    import torch

    return torch.where(desirable, spec.desirable_weight * (1 - torch.sigmoid(spec.beta * (r - z))),
                       spec.undesirable_weight * (1 - torch.sigmoid(spec.beta * (z - r))))


@kto_loss("apo_zero_unpaired", uses_kl=False)
def _apo_zero(r, z, desirable, spec):
    import torch

    return torch.where(desirable, spec.desirable_weight * (1 - torch.sigmoid(spec.beta * r)),
                       spec.undesirable_weight * torch.sigmoid(spec.beta * r))
