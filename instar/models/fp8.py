"""`precision: fp8`: swap the model's eligible linears for `Float8Linear`, and prove FP8 ran.

Eligible: an `nn.Linear` whose in and out features are multiples of 16 (what FP8 GEMMs need).
Embeddings are not linears, and the LM head is left alone on purpose: the logits are the most
precision-sensitive GEMM and FP8 recipes (torchao, TransformerEngine) keep it in high precision.
"""

from __future__ import annotations

import torch

from instar.errors import RecipeError, TrainingError
from instar.kernels.fp8.linear import ALIGN, GEMMS, Float8Linear, eligible


def convert_to_float8(model: torch.nn.Module, fp8_config, stage: str) -> int:
    """Swap eligible linears in place; returns how many. None eligible is a recipe error."""
    head = model.get_output_embeddings()
    history = fp8_config.amax_history_len if fp8_config.scaling == "delayed" else 0
    swapped, skipped = 0, []
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is head:
            continue
        if not eligible(module):
            skipped.append(f"{name} ({module.in_features}x{module.out_features})")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Float8Linear.from_linear(module, amax_history_len=history))
        swapped += 1
    if not swapped:
        why = f"not multiples of {ALIGN}: {', '.join(skipped[:4])}" if skipped else "it has none besides the LM head"
        raise RecipeError(f"stages.{stage}.precision: fp8 found no linear layer to run in FP8 ({why}). Use "
                          f"precision: bf16, or a model whose hidden and intermediate sizes are multiples of {ALIGN}")
    return swapped


def amax_histories(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Delayed scaling's amax histories, keyed `<linear>.<input|weight|grad>`; empty with dynamic
    scaling. Training state for checkpoints (this rank's: each rank scales its own activations and
    gradients), never weights: they are not in the state dict, so the HF export leaves them out."""
    return {f"{name}.{key}": history.values.cpu()
            for name, module in model.named_modules() if isinstance(module, Float8Linear) and module.histories
            for key, history in module.histories.items()}


def load_amax_histories(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore what `amax_histories` returned for the same model and fp8 settings."""
    assert state.keys() == amax_histories(model).keys(), "amax histories of another model or fp8 config"
    for name, module in model.named_modules():
        if isinstance(module, Float8Linear) and module.histories:
            for key, history in module.histories.items():
                history.values = state[f"{name}.{key}"].clone()


class Fp8GemmCheck:
    """FP8 GEMMs run per optimizer step; a step with none when fp8 was asked for is an error, since
    the run would silently be a bf16 run."""

    def __init__(self, enabled: bool, stage: str):
        self.enabled, self.stage = enabled, stage
        self.seen = GEMMS.total

    def step_metrics(self) -> dict[str, int]:
        if not self.enabled:
            return {}
        ran, self.seen = GEMMS.total - self.seen, GEMMS.total
        if ran == 0:
            raise TrainingError(f"stage '{self.stage}': precision is fp8 but this step ran no FP8 GEMM (the "
                                f"FP8 linears were bypassed); check that the model's forward calls its linears")
        return {"fp8_gemms": ran}
