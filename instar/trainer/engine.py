"""The engine interface: one object that owns the model, its optimizer and its precision.

The loop only talks to this interface, so the same loop runs in one process and on DeepSpeed
ZeRO across ranks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator

import torch

from instar.errors import RecipeError


def resolve_device(name: str, stage: str = "?") -> torch.device:
    """The device `distributed.device` names: `auto` is this rank's GPU when CUDA is available
    (LOCAL_RANK picks it under torchrun), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(f"stages.{stage}.distributed.device=cuda, but torch {torch.__version__} sees no CUDA "
                          f"device (torch.cuda.is_available() is False); use device: auto or cpu here")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class Engine(ABC):
    name: str
    model: torch.nn.Module  # what the loss is computed with (a DeepSpeed engine wraps the HF model)
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the weights live; the loop moves batches here

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
    def hooks_lifted(self) -> Iterator[None]:
        """While inside, the engine's own forward hooks are off the model `export_model` returned,
        so eval on rank 0 decodes it like a plain HF model (fast_decode refuses hooked models).
        Local to the calling rank."""
        yield

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

    def all_reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks (one process: the tensor itself). Every rank must call it with
        a tensor of the same shape and dtype."""
        return tensor

    def barrier(self) -> None:
        """Wait for every rank (one process: nothing to wait for)."""


ENGINES = {"single": "instar.trainer.single_engine:SingleEngine",
           "deepspeed": "instar.trainer.deepspeed_engine:DeepSpeedEngine"}


def engine_class(name: str) -> type[Engine]:
    import importlib

    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(model: torch.nn.Module, spec, layout, stage: str) -> Engine:
    """The engine the stage's `distributed.engine` names; every engine takes (model, resolved stage
    spec, batch layout, stage name)."""
    return engine_class(spec.distributed.engine)(model, spec, layout, stage)
