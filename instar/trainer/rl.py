"""GRPO's arithmetic in plain torch: group advantages, the clipped per-token objective, the k3 KL
and how the per-token losses are reduced (see ../shared/notes/algorithms.md).

Names follow TRL's GRPOConfig so that users switching over find the same switches:
- `scale_rewards`: `group` divides by the group's std (GRPO), `batch` by the whole batch's std,
  `none` does not divide (Dr.GRPO).
- `loss_type`: `grpo` averages each completion over its own tokens, then over completions;
  `dapo` averages over every completion token of the step; `dr_grpo` divides the summed
  per-token loss by (completions × max_new_tokens), a constant, so length carries no bias.
Every reduction is over the whole optimizer step (all micro-batches, all ranks), so the result
does not depend on how the step is split.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> torch.Tensor:
    """A_i = r_i − mean(group), divided by a std unless `scale_rewards` is `none`.

    `rewards` is [prompts × group_size] laid out group by group. std is the unbiased one (as
    torch and TRL compute it); `eps` keeps groups whose rewards are all equal at advantage 0.
    `batch_std` replaces the std of `rewards` for `batch` scaling (the step spans several ranks).
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(r) − r − 1 with r = ref − logp (≥ 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   ref_logp: torch.Tensor | None, clip_eps: float, beta: float,
                   clip_eps_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−min(ρA, clip(ρ, 1−ε, 1+ε_high)A) + β·KL per token, with ρ = exp(logp − old_logp).

    logp/old_logp/ref_logp are [B, T] log-probs of the sampled tokens; advantages is [B] (one per
    completion). Returns the loss [B, T] and per-token diagnostics (kl, clipped) of the same shape.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv
    loss = -torch.min(unclipped, clipped)
    info = {"clipped": (clipped < unclipped).float()}
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
        info["kl"] = kl
    return loss, info


def reduce_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, denominator: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss.

    `denominator` is the step-wide count the loss type divides by: completions (`grpo`), completion
    tokens (`dapo`) or completions × max_new_tokens (`dr_grpo`).
    """
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        per_completion = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_completion.sum() / denominator
    if loss_type in ("dapo", "dr_grpo"):
        return (loss * mask).sum() / denominator
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target | prefix) per position (0 where the target is ignored), from logits divided by
    the sampling temperature: the distribution the completions were actually drawn from."""
    from instar.data.packing import IGNORE

    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp * (targets != IGNORE)
