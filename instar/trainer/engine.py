"""The engine interface: one object that owns the model, its optimizer and its precision.

The loop only talks to this interface, so the same loop runs in one process and on DeepSpeed
ZeRO across ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

import torch


class Engine(ABC):
    name: str
    model: torch.nn.Module  # what the loss is computed with (a DeepSpeed engine wraps the HF model)
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """Context for the forward pass (mixed precision where the recipe asks for it)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-batch's share of the step's global mean loss."""

    @abstractmethod
    def step(self, lr: float, allow: bool = True) -> tuple[float, bool]:
        """Clip by the global norm and apply the accumulated gradients at `lr`, unless they are
        not finite (or `allow` is False: the caller saw a non-finite loss).

        Returns (global grad norm before clipping, applied). Gradients are cleared either way.
        """

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write the resumable state (weights and optimizer) into `ckpt_dir` (every rank calls)."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what `save` wrote on the same world size and engine."""

    @staticmethod
    @abstractmethod
    def consolidated_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """Whole-model weights from a checkpoint this engine wrote, whatever its world size."""

    @abstractmethod
    def export_model(self) -> torch.nn.Module | None:
        """On rank 0, a whole HF model holding the current weights (for `save_pretrained` and
        eval); None on other ranks. Every rank must call it."""

    @contextmanager
    def generation_model(self) -> Iterator[torch.nn.Module]:
        """The plain HF model for sampling (RL rollouts); every rank must enter it together."""
        yield self.model

    def step_metrics(self) -> dict[str, float]:
        """Optimizer diagnostics of the last `step` for metrics.jsonl (Collage: descent quality and
        lost updates), reduced over ranks. Every rank must call it after `step`."""
        return {}

    def all_reduce_sum(self, value: float) -> float:
        """The sum of `value` over ranks (one process: the value itself)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (one process: nothing to wait for)."""


ENGINES = {"single": "instar.trainer.single_engine:SingleEngine",
           "deepspeed": "instar.trainer.deepspeed_engine:DeepSpeedEngine"}


def engine_class(name: str) -> type[Engine]:
    import importlib

    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(model: torch.nn.Module, spec, layout, stage: str) -> Engine:
    """The engine the stage's `distributed.engine` names."""
    if spec.distributed.engine == "single":
        return engine_class("single")(model, spec)
    return engine_class("deepspeed")(model, spec, layout, stage)
