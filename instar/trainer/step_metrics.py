"""A step's metrics as sums and counts, reduced over micro-batches and ranks before dividing.

A kind's `loss()` returns each metric as a `Mean` (a sum and what it is a mean of, as tensors on
the device: no host sync per micro-batch). The loop adds them up over the step's micro-batches,
then reduces every sum and count — and the loss — in one all-reduce, so a logged value is the mean
over the whole step whatever the world size, accumulation or micro-batch split. (Averaging each
rank's micro-batch means instead weighs a short micro-batch like a long one, and logs rank 0's
view only: DPO's `rewards/margin` read 0.0128 on one process and -0.0050 on two ranks.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mean:
    """`total / count`, kept apart until the step is reduced (tensors or numbers)."""

    total: torch.Tensor | float
    count: torch.Tensor | float

    @classmethod
    def of(cls, values: torch.Tensor, weights: torch.Tensor | None = None) -> "Mean":
        """The mean of `values` (weighted by `weights`, e.g. a token mask), not yet divided."""
        values = values.detach()
        if weights is None:
            return cls(values.sum(), values.numel())
        weights = weights.detach().to(values.dtype)
        return cls((values * weights).sum(), weights.sum())


class StepMetrics:
    """Sums one step's loss and `Mean` metrics over its micro-batches; `reduce` gives the values
    over every rank. Every rank must report the same metric names (they are reduced by position)."""

    def __init__(self):
        self._loss: torch.Tensor | None = None
        self._parts: dict[str, list] = {}

    def add(self, loss: torch.Tensor, metrics: dict[str, Mean]) -> None:
        # fp64 on the device, as Python floats would sum: one host sync a step, so the host queues
        # the next micro-batch while this one's backward runs.
        loss = loss.detach().double()
        self._loss = loss if self._loss is None else self._loss + loss
        for name, mean in metrics.items():
            part = self._parts.setdefault(name, [0.0, 0.0])
            part[0] = part[0] + _exact(mean.total)
            part[1] = part[1] + _exact(mean.count)  # counts are often host numbers: no copy per micro-batch

    def reduce(self, engine) -> tuple[float, dict[str, float]]:
        """(the step's loss, {metric: sum / count}) over all ranks, in one collective."""
        names = sorted(self._parts)
        values = [self._loss if self._loss is not None else 0.0]
        for name in names:
            values.extend(self._parts[name])
        flat = torch.stack([_double(v, engine.device) for v in values])
        flat = engine.all_reduce_tensor(flat).cpu().tolist()
        out = {}
        for i, name in enumerate(names):
            total, count = flat[1 + 2 * i], flat[2 + 2 * i]
            out[name] = total / count if count else float("nan")
        return flat[0], out


def _exact(value):
    """A tensor in fp64 (as Python floats sum), a number as it is."""
    return value.double() if isinstance(value, torch.Tensor) else value


def _double(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)
