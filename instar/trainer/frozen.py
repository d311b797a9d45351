"""Frozen models a stage reads but never trains (the dpo / grpo reference), held the way the
stage's engine holds its policy: in the stage's compute precision and, under ZeRO-3, partitioned
over the ranks instead of whole on each of them."""

from __future__ import annotations

import copy

import torch

from instar.config.precision import precision_policy


def inference_config(train_config: dict, dtype: torch.dtype) -> dict:
    """The policy's DeepSpeed config for a ZeRO-3 model with no optimizer, as TRL's
    `prepare_deepspeed` derives its reference's: the same ZeRO section and batch keys (DeepSpeed
    checks them against the world size), the training-only blocks dropped. TRL's hidden-size bucket
    keys are not copied: it sets them as dotted top-level keys, which DeepSpeed does not read."""
    config = copy.deepcopy(train_config)
    for key in ("optimizer", "scheduler", "torch_autocast", "gradient_clipping", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}  # no master weights: nothing is updated
    return config


def freeze(model: torch.nn.Module, engine, precision: str) -> torch.nn.Module:
    """`model` without gradients, in eval mode, for forwards next to `engine`'s policy: a DeepSpeed
    inference engine partitioned over the ranks when the policy runs on ZeRO-3 (each forward is then
    a collective: every rank must call it as often as the others), else a copy on the engine's
    device. Never a submodule of the policy nor part of its engine."""
    model.requires_grad_(False)
    dtype = precision_policy(precision).compute_dtype
    if getattr(engine, "zero_stage", 0) != 3:
        return model.to(engine.device, dtype).eval()
    import deepspeed

    frozen, *_ = deepspeed.initialize(model=model.to(dtype), config=inference_config(engine.config, dtype))
    frozen.eval()  # DeepSpeed's engine returns None here, not itself
    return frozen


def bytes_held(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: its ZeRO-3 partitions (plus the whole of parameters ZeRO-3
    keeps gathered, under `stage3_param_persistence_threshold`), else every parameter."""
    total = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None:
            total += p.numel() * p.element_size()
        else:
            total += part.numel() * part.element_size() + (p.ds_numel * part.element_size() if p.ds_persist else 0)
    return total
