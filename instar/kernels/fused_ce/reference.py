"""The specification of the per-chunk step, in plain torch.

For one chunk of logits (rows = tokens, columns = vocabulary) and its targets, the summed
cross-entropy of each row, `logsumexp(z) − z[target]`, and its gradient with respect to the
logits, `softmax(z) − onehot(target)`, computed in fp32 and written over the logits in place
(rows whose target is `ignore_index` get loss 0 and gradient 0).

Writing the gradient in the forward pass is what lets the full tokens × vocab logits never
exist: once a chunk's gradient has been multiplied into d(hidden) and d(weight), it is dropped.
"""

from __future__ import annotations

import torch


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row losses (fp32, shape [rows]); `logits` ([rows, vocab]) is overwritten by the gradient."""
    z = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    losses = (lse - z.gather(1, safe[:, None]).squeeze(1)) * valid
    grad = torch.exp(z - lse[:, None])
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    grad *= valid[:, None]
    logits.copy_(grad)
    return losses
