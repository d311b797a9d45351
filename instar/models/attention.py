"""Which attention kernel a stage's model runs, and how a packed batch is handed to it.

SDPA (the default) keeps packed documents apart with a block-diagonal mask (see
`instar.trainer.losses.attention_mask`). Where flash-attn is installed, the model is on a GPU and
attention computes in bf16 (every precision but fp32), the model switches to transformers'
`flash_attention_2`, and a packed batch [rows, seq] is laid out as one row [1, rows * seq] whose
per-document position ids restart at 0: transformers then finds the document boundaries from
them and calls flash-attn's varlen kernel (no mask is built, no attention crosses a document).
"""

from __future__ import annotations

import importlib.util

import torch

from instar.config.precision import precision_policy
from instar.models.wrapped import hf_model

FLASH = "flash_attention_2"


def flash_attention_usable(device: torch.device, precision: str) -> bool:
    return (device.type == "cuda" and precision_policy(precision).compute_dtype == torch.bfloat16
            and importlib.util.find_spec("flash_attn") is not None)


def select_attention(model: torch.nn.Module, device: torch.device, precision: str) -> str:
    """Switch `model` (or the HF model a DeepSpeed engine wraps) to flash-attn varlen where it
    can run; returns the implementation in use."""
    hf = hf_model(model)
    if flash_attention_usable(device, precision) and hf.config._attn_implementation != FLASH:
        hf.set_attn_implementation(FLASH)
    return hf.config._attn_implementation


def uses_flash_attention(model: torch.nn.Module) -> bool:
    return getattr(hf_model(model).config, "_attn_implementation", None) == FLASH


def flatten_rows(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids) of every row laid end to end as one row [1, rows * seq].

    Each row's first document starts at position 0 and padding has position 0 (collate_rows), so
    position ids restart exactly at every document and every padding token: flash-attn's varlen
    path treats each as its own sequence."""
    return batch.input_ids.reshape(1, -1), batch.position_ids.reshape(1, -1)
