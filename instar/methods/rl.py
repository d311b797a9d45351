"""GRPO's arithmetic in plain torch: group advantages, the clipped per-token objective, the k3 KL
and how the per-token losses are reduced (formulas and sources: docs/algorithms.md).

Names follow TRL's GRPOConfig so that users switching over find the same switches; both are
registries (a new variant is one registered entry, checked by name when the recipe loads):
- `scale_rewards` (ADVANTAGE_SCALES): `group` divides by the group's std (GRPO), `batch` by the
  whole batch's std, `none` does not divide (Dr.GRPO).
- `loss_type` (LOSS_TYPES): `grpo` averages each completion over its own tokens, then over
  completions; `dapo` averages over every completion token of the step; `dr_grpo` divides the
  summed per-token loss by (completions × max_new_tokens), a constant, so length carries no bias.
Every reduction is over the whole optimizer step (all micro-batches, all ranks), so the result
does not depend on how the step is split. torch is imported inside the functions: the recipe
checks names without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from instar.registry import Registry

if TYPE_CHECKING:
    import torch

# (centred rewards [prompts, group], rewards [prompts, group], std over the whole step or None, eps)
AdvantageScale = Callable[["torch.Tensor", "torch.Tensor", "float | None", float], "torch.Tensor"]
ADVANTAGE_SCALES: Registry[AdvantageScale] = Registry("advantage scaling (scale_rewards)")


@ADVANTAGE_SCALES.register("group")
def _by_group_std(centred, groups, batch_std, eps):
    return centred / (groups.std(dim=1, keepdim=True) + eps)


@ADVANTAGE_SCALES.register("batch")
def _by_batch_std(centred, groups, batch_std, eps):
    return centred / ((groups.std() if batch_std is None else batch_std) + eps)


@ADVANTAGE_SCALES.register("none")
def _unscaled(centred, groups, batch_std, eps):
    return centred


@dataclass(frozen=True)
class LossType:
    """How a GRPO step's per-token losses become one number."""

    # (completions, completion tokens, max_new_tokens) of the whole step -> what the summed loss is divided by
    denominator: Callable[[float, float, int], float]
    per_completion_mean: bool  # first average each completion over its own tokens (grpo)


LOSS_TYPES: Registry[LossType] = Registry("GRPO loss type")
LOSS_TYPES.register("grpo")(LossType(lambda completions, tokens, max_new_tokens: completions, per_completion_mean=True))
LOSS_TYPES.register("dapo")(LossType(lambda completions, tokens, max_new_tokens: tokens, per_completion_mean=False))
LOSS_TYPES.register("dr_grpo")(LossType(lambda completions, tokens, max_new_tokens: completions * max_new_tokens,
                                        per_completion_mean=False))


def group_advantages(rewards: "torch.Tensor", group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> "torch.Tensor":
    """A_i = r_i − mean(group), scaled as `scale_rewards` names.

    `rewards` is [prompts × group_size] laid out group by group. std is the unbiased one (as
    torch and TRL compute it); `eps` keeps groups whose rewards are all equal at advantage 0.
    `batch_std` replaces the std of `rewards` for `batch` scaling (the step spans several ranks).
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return ADVANTAGE_SCALES[ADVANTAGE_SCALES.validate(scale_rewards)](centred, groups, batch_std, eps).reshape(-1)


def k3_kl(logp: "torch.Tensor", ref_logp: "torch.Tensor") -> "torch.Tensor":
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(r) − r − 1 with r = ref − logp (≥ 0)."""
    import torch

    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def per_token_loss(logp: "torch.Tensor", old_logp: "torch.Tensor", advantages: "torch.Tensor",
                   ref_logp: "torch.Tensor | None", clip_eps: float, beta: float,
                   clip_eps_high: float | None = None) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
    """−min(ρA, clip(ρ, 1−ε, 1+ε_high)A) + β·KL per token, with ρ = exp(logp − old_logp).

    logp/old_logp/ref_logp are [B, T] log-probs of the sampled tokens; advantages is [B] (one per
    completion). Returns the loss [B, T] and per-token diagnostics (kl, clipped) of the same shape.
    """
    import torch

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


def reduce_loss(loss: "torch.Tensor", mask: "torch.Tensor", loss_type: str, denominator: float) -> "torch.Tensor":
    """This micro-batch's share of the step's loss.

    `denominator` is the step-wide count the loss type divides by (`LOSS_TYPES[...].denominator`):
    completions (`grpo`), completion tokens (`dapo`) or completions × max_new_tokens (`dr_grpo`).
    """
    mask = mask.to(loss.dtype)
    if LOSS_TYPES[LOSS_TYPES.validate(loss_type)].per_completion_mean:
        per_completion = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_completion.sum() / denominator
    return (loss * mask).sum() / denominator


def token_logps(logits: "torch.Tensor", targets: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """log π(target | prefix) per position (0 where the target is ignored), from logits divided by
    the sampling temperature: the distribution the completions were actually drawn from."""
    import torch

    from instar.data.example import IGNORE

    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp * (targets != IGNORE)
