"""The HF model inside what trains it: a DeepSpeed engine keeps it as `.module`."""

from __future__ import annotations

import torch


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself, or the HF model a DeepSpeed engine (any wrapper with `.module`) wraps."""
    return getattr(model, "module", model)
