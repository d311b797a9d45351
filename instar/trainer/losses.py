"""Losses shared by kinds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instar.data.batch import Batch
from instar.data.packing import IGNORE, block_diagonal_mask
from instar.models.attention import flatten_rows, uses_flash_attention
from instar.models.wrapped import hf_model


def attention_mask(model, batch: Batch) -> torch.Tensor | None:
    """The block-diagonal mask of a packed batch, in the dtype attention will compute in (the
    autocast dtype under autocast: CUDA's fused SDPA kernels want the mask in the query's dtype).

    None when every row is one document from position 0, padding (doc id -1) only after it: plain
    causal attention then gives every real token what the mask would (padding attends to more, but
    its outputs are never used), and SDPA takes its causal/flash kernel. Long pretraining text cut
    to seq_len, one conversation per SFT row and GRPO's prompt + completion rows are such batches."""
    if not batch.one_document_per_row:
        param = next(model.parameters())
        kind = param.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else param.dtype
        return block_diagonal_mask(batch.doc_ids, dtype)
    return None


def _model_inputs(model, batch: Batch) -> dict[str, torch.Tensor | None]:
    """The forward's ids, positions and mask. A packed batch for a flash-attn model runs as one row
    whose position ids split the documents (no mask); the caller views the output back as [rows, seq]."""
    if uses_flash_attention(model) and not batch.one_document_per_row:
        input_ids, position_ids = flatten_rows(batch)
        return {"input_ids": input_ids, "position_ids": position_ids}
    return {"input_ids": batch.input_ids, "attention_mask": attention_mask(model, batch),
            "position_ids": batch.position_ids}


def forward_logits(model, batch: Batch) -> torch.Tensor:
    """Logits of a (possibly packed) batch: per-document positions, and documents kept apart by a
    block-diagonal mask (SDPA) or by flash-attn's varlen kernel (see instar.models.attention).

    use_cache=False matters: with a cache HF Llama ignores restarting position ids.
    """
    logits = model(**_model_inputs(model, batch), use_cache=False).logits
    return logits.view(*batch.input_ids.shape, -1)


def forward_hidden(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's last hidden states and the LM head's weight (tied or not), without running
    the head: what the fused linear + cross-entropy takes instead of logits."""
    hf = hf_model(model)
    hidden = hf.model(**_model_inputs(hf, batch), use_cache=False).last_hidden_state
    return hidden.view(*batch.input_ids.shape, -1), hf.get_output_embeddings().weight


def causal_lm_loss(model, batch: Batch, n_targets: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over the batch's targets, divided by `n_targets`
    (all target tokens of the optimizer step), so accumulation weighs every token equally."""
    from instar.models.swaps import uses_fused_ce

    if uses_fused_ce(hf_model(model)):
        from instar.kernels.fused_ce import linear_cross_entropy

        hidden, head = forward_hidden(model, batch)
        return linear_cross_entropy(hidden, head, batch.targets, ignore_index=IGNORE) / n_targets, {}
    logits = forward_logits(model, batch)
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE, reduction="sum")
    return loss_sum / n_targets, {}
