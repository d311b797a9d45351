"""Single-process engine: plain torch; fp32 weights (bf16 autocast optional) or, for bf16-pure and
Collage, bf16 weights with no fp32 copy."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instar.errors import ContractError
from instar.trainer.engine import Engine, resolve_device
from instar.trainer.collage_optim import CollageAdamW, descent_metrics, state_bytes
from instar.config.precision import precision_policy
from instar.trainer.optim import build_optimizer, param_groups


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. a tied LM head) kept once: safetensors wants that."""
    seen: set[int] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().contiguous()
    return out


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """The state dict's keys that name one shared tensor (e.g. a tied LM head and the embedding)."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict().items():
        groups.setdefault(tensor.data_ptr(), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                 source: str = "the checkpoint's consolidated weights") -> None:
    """Load a whole-model state dict strictly. A tied tensor may come under any one of its names
    (safetensors and DeepSpeed's gather keep one); any other missing or unexpected key is an error
    naming the keys and `source`."""
    state = dict(weights)
    for group in tied_groups(model):
        given = next((key for key in group if key in state), None)
        if given is not None:
            for key in group:
                state.setdefault(key, state[given])
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ContractError(f"{source} does not fit {type(model).__name__}: missing keys {missing}, unexpected "
                            f"keys {unexpected}; it was written for another model config")
    model.load_state_dict(state, strict=True)


class SingleEngine(Engine):
    name = "single"

    def __init__(self, model: torch.nn.Module, spec, layout=None, stage: str = "?"):
        # `layout` (the batch arithmetic) is DeepSpeed's business; one process only accumulates.
        self.device = resolve_device(spec.distributed.device, stage)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = precision_policy(spec.precision)
        self.model = model.to(self.device, self.precision.param_dtype)
        self.optimizer = build_optimizer(param_groups(model, spec.optimizer.weight_decay), self.precision,
                                         spec.optimizer, guarded=True, max_grad_norm=spec.train.max_grad_norm)

    def autocast(self):
        if self.precision.autocast:  # fp8: FP8 linears, everything else in bf16
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, allow: bool = True) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.skip_next = not allow
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.optimizer.last_grad_norm, self.optimizer.last_applied

    def step_metrics(self) -> dict[str, float]:
        if isinstance(self.optimizer, CollageAdamW):
            return {**descent_metrics(self.optimizer.pop_stats()), "optim_state_mb": state_bytes(self.optimizer) / 2**20}
        return {}

    def save(self, ckpt_dir: Path) -> None:
        save_file(unique_state_dict(self.model), str(ckpt_dir / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        load_weights(self.model, load_file(str(ckpt_dir / "model.safetensors")), str(ckpt_dir / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))

    @staticmethod
    def consolidated_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(ckpt_dir / "model.safetensors"))

    def export_model(self) -> torch.nn.Module:
        return self.model
