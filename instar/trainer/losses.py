"""Losses shared by kinds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instar.data.packing import IGNORE, block_diagonal_mask


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a (possibly packed) batch: block-diagonal causal mask and per-document positions.

    use_cache=False matters: with a cache HF Llama ignores restarting position ids.
    """
    dtype = next(model.parameters()).dtype
    mask = block_diagonal_mask(batch["doc_ids"], dtype)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                use_cache=False)
    return out.logits


def causal_lm_loss(model, batch: dict[str, torch.Tensor], n_targets: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over the batch's targets, divided by `n_targets`
    (all target tokens of the optimizer step), so accumulation weighs every token equally."""
    logits = forward_logits(model, batch)
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                               ignore_index=IGNORE, reduction="sum")
    return loss_sum / n_targets, {}
