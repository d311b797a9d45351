"""Module swaps a recipe asks for, applied to the model before the engine wraps it.

`kernels.rmsnorm` puts a fused RMSNorm in place of each Llama-style RMSNorm, `kernels.fused_ce`
marks the model so next-token losses run the fused linear + cross-entropy, and `precision: fp8`
turns eligible linears into FP8 ones. State-dict keys never change, so checkpoints and the
exported HF artifact are the same as without swaps.
"""

from __future__ import annotations

import torch

from instar.config.precision import precision_policy
from instar.errors import RecipeError

# RMSNorms computing exactly `weight * (x * rsqrt(mean(x²) + eps)).to(dtype)`. Gemma's (1 + weight)
# and others differ, so they are left alone rather than guessed at.
LLAMA_STYLE_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
FUSED_CE_ATTR = "instar_fused_ce"


def fuse_rmsnorms(model: torch.nn.Module) -> int:
    """Swap every Llama-style RMSNorm for `FusedRMSNorm` (same parameter); returns how many."""
    from instar.kernels.rmsnorm import FusedRMSNorm

    targets = [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ in LLAMA_STYLE_RMSNORMS]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedRMSNorm(mod.weight, mod.variance_epsilon))
    return len(targets)


def uses_fused_ce(model: torch.nn.Module) -> bool:
    return bool(getattr(model, FUSED_CE_ATTR, False))


def apply_swaps(model: torch.nn.Module, spec, stage: str, causal_lm_loss: bool) -> dict[str, int]:
    """Apply what `spec.kernels` and `spec.precision` ask for; returns counts of what was swapped.
    `causal_lm_loss`: whether the stage's loss is next-token cross-entropy (the kind declares it),
    the one loss the fused linear + cross-entropy computes. Asking for a swap the model has nothing
    to apply to is an error, not a silent no-op."""
    done: dict[str, int] = {}
    if spec.kernels.rmsnorm:
        done["rmsnorm"] = fuse_rmsnorms(model)
        if not done["rmsnorm"]:
            kinds = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
            raise RecipeError(f"stages.{stage}.kernels.rmsnorm: the model has no Llama-style RMSNorm to fuse "
                              f"(its norms: {', '.join(kinds) or 'none'}; fused: {', '.join(LLAMA_STYLE_RMSNORMS)}). "
                              f"Set kernels.rmsnorm: false for this model")
    if spec.kernels.fused_ce:
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None or not hasattr(model, "model"):
            raise RecipeError(f"stages.{stage}.kernels.fused_ce: the model has no bias-free LM head over a "
                              f"`.model` backbone to fuse; set kernels.fused_ce: false")
        if spec.distributed.engine == "deepspeed" and spec.distributed.zero_stage == 3:
            raise RecipeError(f"stages.{stage}.kernels.fused_ce: not supported under ZeRO-3 (the LM head's weight "
                              f"is partitioned outside its own forward); use zero_stage <= 2 or fused_ce: false")
        if causal_lm_loss:
            setattr(model, FUSED_CE_ATTR, True)
            done["fused_ce"] = 1
        else:
            from instar.console import say

            say(f"[{stage}] kernels.fused_ce: a {spec.kind} stage computes its loss from logits, not next-token "
                f"cross-entropy; the fused linear + cross-entropy does not apply and is not used")
    if precision_policy(spec.precision).fp8:
        from instar.models.fp8 import convert_to_float8

        done["fp8_linears"] = convert_to_float8(model, spec.fp8, stage)
    return done
