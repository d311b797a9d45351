"""KTO's losses by name (the `kto` kind's `loss:`): per-completion losses from the completions'
policy/reference log-ratios r, the step's KL estimate z and their labels (formulas: the kto kind)."""

from __future__ import annotations

from typing import Callable

from instar.registry import Registry

# (log-ratios r [n], KL estimate z, desirable [n] bool, spec) -> per-completion losses [n]
KTO_LOSSES: Registry[Callable] = Registry("KTO loss")


@KTO_LOSSES.register("kto")
def _kto(r, z, desirable, spec):
    import torch

    return torch.where(desirable, spec.desirable_weight * (1 - torch.sigmoid(spec.beta * (r - z))),
                       spec.undesirable_weight * (1 - torch.sigmoid(spec.beta * (z - r))))


@KTO_LOSSES.register("apo_zero_unpaired")
def _apo_zero(r, z, desirable, spec):
    import torch

    return torch.where(desirable, spec.desirable_weight * (1 - torch.sigmoid(spec.beta * r)),
                       spec.undesirable_weight * torch.sigmoid(spec.beta * r))
