"""The DeepSpeed config a stage runs with: generated from the recipe, then the recipe's raw
`distributed.deepspeed_config` merged over it. A raw key that contradicts a generated one (a
different micro-batch, say) is an error naming both values; an unknown key is an error with the
closest known key."""

from __future__ import annotations

import difflib
import re
from typing import Any

from instar.errors import RecipeError
from instar.trainer.batch import BatchLayout
from instar.config.precision import precision_policy

# Top-level sections DeepSpeed reads besides the scalar keys in deepspeed.runtime.constants.
_SECTIONS = {
    "zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb",
    "csv_monitor", "comet", "autotuning", "compression_training", "elasticity", "aio", "nebula",
    "data_efficiency", "curriculum_learning", "checkpoint", "optimizer", "scheduler", "amp", "fp16", "bf16",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "sparse_attention", "pipeline", "timers",
    "weight_quantization", "hybrid_engine", "compile", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "data_types", "torch_autocast", "gradient_accumulation_dtype", "sequence_parallel_size",
}


def _known_top_level() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items()
             if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]*", v)}
    return names | _SECTIONS


def _known_zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    keys = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        keys.add(name)
        if info.alias:
            keys.add(info.alias)
    return keys


def _bf16_section(precision: str, zero_stage: int) -> dict[str, Any]:
    """DeepSpeed's bf16 mode is for the precisions with bf16 parameters only (`bf16` and fp8 run
    under `torch_autocast`, see below). bf16-pure and Collage keep no fp32 copy:
    at ZeRO 1-3 both flags below make DeepSpeed hand the client optimizer this rank's flat bf16
    partition with a bf16 gradient (either flag alone asserts). Stage 0 refuses the flags
    ("only supported with ZeRO Stage 1, 2, or 3") and with bf16 enabled swaps fp32 masters into
    the optimizer, so there bf16 stays off and the engine casts the module to bf16 itself."""
    if precision_policy(precision).bf16_params:
        if zero_stage == 0:
            return {"enabled": False}
        return {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return {"enabled": False}


def _torch_autocast_section() -> dict[str, Any]:
    """bf16 and fp8 run as on the single engine: fp32 weights and gradients, bf16 autocast around
    the forward (the engine's `autocast`; for fp8, around the FP8 linears). DeepSpeed's own bf16
    mode would instead cast the module to bf16 and keep fp32 masters in the optimizer: another
    forward, other losses. DeepSpeed's forward switches an outer autocast off unless
    this section is on; no module is named lower-precision-safe, so every gradient is reduced in
    fp32 (by default DeepSpeed would reduce nn.Linear gradients, the LM head's, in bf16)."""
    return {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def generate(spec, layout: BatchLayout) -> dict[str, Any]:
    dist = spec.distributed
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if dist.offload_param:
        if dist.zero_stage != 3:
            raise RecipeError(f"distributed.offload_param needs zero_stage 3 (got {dist.zero_stage})")
        zero["offload_param"] = {"device": "cpu"}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        # ZeRO 1-3 clip inside DeepSpeed; at stage 0 instar's GuardedAdamW clips (and skips
        # non-finite steps, which stage 0 would otherwise apply).
        "gradient_clipping": float(spec.train.max_grad_norm or 0.0) if dist.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": _bf16_section(spec.precision, dist.zero_stage),
        **({"torch_autocast": _torch_autocast_section()} if precision_policy(spec.precision).autocast else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _check_keys(raw: dict[str, Any], stage: str) -> None:
    where = f"stages.{stage}.distributed.deepspeed_config"
    known = _known_top_level()
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}.{key}: not a DeepSpeed config key{hint}")
    zero_keys = _known_zero_keys()
    for key in raw.get("zero_optimization", {}) or {}:
        if key not in zero_keys:
            close = difflib.get_close_matches(key, sorted(zero_keys), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}.zero_optimization.{key}: not a DeepSpeed ZeRO key{hint}")


def _merge(generated: dict, raw: dict, path: str, stage: str) -> dict:
    out = dict(generated)
    for key, value in raw.items():
        here = f"{path}.{key}" if path else key
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, here, stage)
        elif key in out and out[key] != value:
            raise RecipeError(
                f"stages.{stage}.distributed.deepspeed_config.{here}={value!r} contradicts the recipe, which "
                f"gives {out[key]!r}; set it through the recipe's own field (train / distributed / precision) "
                f"or drop it from deepspeed_config")
        else:
            out[key] = value
    return out


def deepspeed_config(spec, layout: BatchLayout, stage: str) -> dict[str, Any]:
    raw = spec.distributed.deepspeed_config
    _check_keys(raw, stage)
    config = _merge(generate(spec, layout), raw, "", stage)
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if precision_policy(spec.precision).bf16_params and accum in ("fp32", "float32", "float", "torch.float32"):
        raise RecipeError(
            f"stages.{stage}.distributed.deepspeed_config.data_types.grad_accum_dtype={accum!r} with precision "
            f"{spec.precision!r}: DeepSpeed then keeps fp32 master partitions (its BF16_Optimizer) and ignores "
            f"bf16_master_weights_and_grads, which {spec.precision} exists to avoid. Drop grad_accum_dtype, "
            f"or use precision `bf16` for fp32 masters")
    return config
