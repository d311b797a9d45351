"""Fused linear + cross-entropy: Σ CE(hidden @ weightᵀ, targets) without the whole logits.

Tokens are taken in chunks. For each chunk the logits are made (one matmul), the chunk step
(Triton on CUDA, reference elsewhere) turns them into losses and the gradient in place, and the
gradient is multiplied straight into d(hidden) and d(weight). Peak extra memory is one chunk of
logits plus the gradients of the inputs, instead of tokens × vocab (several times over) for
`F.cross_entropy(hidden @ weightᵀ)`. Backward only scales the stored gradients.
"""

from __future__ import annotations

import torch

from instar.kernels.dispatch import kernel_backend

IGNORE_INDEX = -100


def chunk_rows(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a chunk of logits about as big as the hidden states themselves (as Liger
    does), at least 16 tokens and a power of two."""
    rows = max(16, -(-n_tokens * hidden // vocab))
    return min(1 << (rows - 1).bit_length(), max(n_tokens, 1))


def _chunk_step(logits, targets, ignore_index):
    if kernel_backend(logits.is_cuda) == "triton":
        from instar.kernels.fused_ce.triton import cross_entropy_grad_
    else:
        from instar.kernels.fused_ce.reference import cross_entropy_grad_
    return cross_entropy_grad_(logits, targets, ignore_index)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk):
        n = hidden.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            logits = h @ weight.t()
            loss += _chunk_step(logits, targets[start:start + chunk], ignore_index).sum()
            if need_dh:
                torch.mm(logits, weight, out=dh[start:start + chunk])
            if need_dw:
                if logits.dtype == torch.float32:
                    dw.addmm_(logits.t(), h)
                else:  # a low-precision product, summed over chunks in fp32
                    dw += logits.t() @ h
            del logits
        ctx.save_for_backward(dh, dw.to(weight.dtype) if need_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss.to(dh.dtype) if dh is not None else None,
                dw * grad_loss.to(dw.dtype) if dw is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` ([..., H]) through the LM head `weight` ([V, H])
    against `targets` ([...], `ignore_index` rows skipped); an fp32 scalar.

    Under autocast the matmuls run in the autocast dtype, as `lm_head` would.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target ids must lie in [0, {vocab}) or be {ignore_index}; got "
                         f"{targets[bad][:5].tolist()}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    chunk = chunk or chunk_rows(hidden.shape[0], hidden.shape[1], vocab)
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, targets.contiguous(),
                                                ignore_index, chunk)
