"""Optimizers the engines hand to torch or DeepSpeed, chosen by the stage's `precision`."""

from __future__ import annotations

import math

import torch

from instar.config.precision import PrecisionPolicy
from instar.config.schema import OptimizerConfig
from instar.trainer.collage_optim import CollageAdamW


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (norms, biases and other 1-D params are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GradientGuard:
    """Clip by the global gradient norm and skip the update when that norm is not finite (or the
    caller said the loss was not). For engines where nothing upstream does it: one process, and
    ZeRO stage 0 (whose gradients are all-reduced before `step`). Mixed in before an optimizer."""

    def _init_guard(self, max_grad_norm: float | None) -> None:
        self.max_grad_norm = max_grad_norm
        self.skip_next = False
        self.last_grad_norm = float("nan")
        self.last_applied = True

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        clip = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
        self.last_applied = math.isfinite(self.last_grad_norm) and not self.skip_next
        self.skip_next = False
        if self.last_applied:
            return super().step(closure)
        return None


class GuardedAdamW(GradientGuard, torch.optim.AdamW):
    def __init__(self, params, cfg: OptimizerConfig, max_grad_norm: float | None):
        super().__init__(params, lr=0.0, betas=cfg.betas, eps=cfg.eps, foreach=True)
        self._init_guard(max_grad_norm)


class GuardedCollageAdamW(GradientGuard, CollageAdamW):
    def __init__(self, params, cfg: OptimizerConfig, max_grad_norm: float | None, variant: str):
        super().__init__(params, lr=0.0, betas=cfg.betas, eps=cfg.eps, variant=variant)
        self._init_guard(max_grad_norm)


def build_optimizer(groups: list[dict], precision: PrecisionPolicy, cfg: OptimizerConfig, guarded: bool,
                    max_grad_norm: float | None) -> torch.optim.Optimizer:
    """Collage AdamW for collage-*, torch AdamW otherwise; `guarded` adds clip-and-skip."""
    variant = precision.collage
    if variant is not None:
        if guarded:
            return GuardedCollageAdamW(groups, cfg, max_grad_norm, variant)
        return CollageAdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, variant=variant)
    if guarded:
        return GuardedAdamW(groups, cfg, max_grad_norm)
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps)
