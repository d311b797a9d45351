"""The engine interface: one object that owns the model, its optimizer and its precision.

The loop only talks to this interface, so the same loop runs on the single-process engine
and (later) on DeepSpeed ZeRO.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path

import torch


class Engine(ABC):
    model: torch.nn.Module
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """Context for the forward pass (mixed precision where the recipe asks for it)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (already scaled for accumulation by the caller)."""

    @abstractmethod
    def step(self, lr: float, max_grad_norm: float | None, allow: bool = True) -> tuple[float, bool]:
        """Clip, and apply the accumulated gradients at `lr` unless they (or the loss, which the
        caller reports as `allow=False`) are not finite.

        Returns (grad_norm before clipping, applied). Gradients are zeroed either way.
        """

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write the resumable state (weights and optimizer) into `ckpt_dir`."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what `save` wrote."""

    @abstractmethod
    def export_model(self) -> torch.nn.Module:
        """A full (unsharded) HF model holding the current weights, for `save_pretrained`."""


def build_engine(model: torch.nn.Module, spec) -> Engine:
    """The engine the stage's `distributed.engine` names."""
    from instar.trainer.single_engine import SingleEngine

    if spec.distributed.engine == "single":
        return SingleEngine(model, spec.optimizer, spec.precision)
    raise AssertionError(f"unhandled engine {spec.distributed.engine}")  # the schema admits no other
