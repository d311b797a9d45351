"""Batch arithmetic: micro-batch x accumulation x ranks = global batch, checked."""

from __future__ import annotations

from dataclasses import dataclass

from instar.config.schema import TrainConfig
from instar.errors import RecipeError


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int  # rows per rank per forward
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_layout(train: TrainConfig, world_size: int, stage: str = "?") -> BatchLayout:
    """The layout for `world_size` ranks. With `global_batch_size` set, accumulation is derived
    and the global batch must split evenly over ranks and micro-batches."""
    if train.global_batch_size is None:
        return BatchLayout(train.micro_batch_size, train.grad_accum, world_size)
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise RecipeError(
            f"stages.{stage}.train.global_batch_size={train.global_batch_size} is not divisible by "
            f"micro_batch_size {train.micro_batch_size} x {world_size} ranks = {per_step}; pick a global batch "
            f"that is a multiple of {per_step}, or change micro_batch_size / nproc_per_node")
    return BatchLayout(train.micro_batch_size, train.global_batch_size // per_step, world_size)
