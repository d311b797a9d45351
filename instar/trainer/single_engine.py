"""Single-process engine: plain torch, fp32 weights, optional bf16 autocast."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instar.config.schema import OptimizerConfig
from instar.trainer.engine import Engine


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms, biases and embeddings' 1-D params excluded)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, foreach=True)


class SingleEngine(Engine):
    def __init__(self, model: torch.nn.Module, optimizer: OptimizerConfig, precision: str):
        self.model = model
        self.precision = precision
        self.optimizer = make_optimizer(model, optimizer)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, max_grad_norm: float | None, allow: bool = True) -> tuple[float, bool]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = max_grad_norm if max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
        applied = allow and math.isfinite(norm)
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def save(self, ckpt_dir: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        # Tied weights share storage; safetensors wants each tensor once.
        seen: dict[int, str] = {}
        unique = {}
        for key, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen[tensor.data_ptr()] = key
            unique[key] = tensor
        save_file(unique, str(ckpt_dir / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        weights = load_file(str(ckpt_dir / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= _tied_keys(self.model), (missing, unexpected)
        self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))

    def export_model(self) -> torch.nn.Module:
        return self.model


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys that alias another key's storage (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.add(key)
        seen.setdefault(tensor.data_ptr(), key)
    return tied
