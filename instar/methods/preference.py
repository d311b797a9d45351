"""Preference objectives by name (the `dpo` kind's `loss:`), and the per-pair log-probs they take.

A loss maps a batch of pairs' summed completion log-probs to per-pair losses. With
h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), summed over completion tokens
(formulas and sources: docs/algorithms.md):
- `sigmoid` (DPO): −(1−ε)·log σ(βh) − ε·log σ(−βh), ε = label_smoothing
- `ipo`: (h̄ − 1/(2β))² with per-token mean log-probs h̄ (as TRL does)
- `hinge`: max(0, 1 − βh)
- `redi` (reference-free): −log π(y_w)/|y_w| + α·log π(y_l)/|y_l|
`nll_coef` adds c·(−log π(y_w)/|y_w|) to any of them. A new loss is one registered function;
`reference_free` ones never load a reference model. No torch at import (the recipe checks names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from instar.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of P pairs under the policy and the reference, and the
    completions' token counts (tensors of shape [P])."""

    policy_chosen: "torch.Tensor"
    policy_rejected: "torch.Tensor"
    ref_chosen: "torch.Tensor"
    ref_rejected: "torch.Tensor"
    n_chosen: "torch.Tensor"
    n_rejected: "torch.Tensor"

    @property
    def log_ratio_margin(self) -> "torch.Tensor":
        """h: the chosen completion's policy/reference log-ratio minus the rejected one's."""
        return (self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected)


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable[[PairLogps, object], "torch.Tensor"]  # (pairs, the stage's DpoSpec) -> [P] losses
    reference_free: bool = False


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("DPO loss")


def preference_loss(name: str, reference_free: bool = False):
    """Register `fn(pairs, spec) -> per-pair losses` as the DPO loss `name`."""
    def add(fn):
        PREFERENCE_LOSSES.register(name)(PreferenceLoss(fn, reference_free))
        return fn

    return add


@preference_loss("sigmoid")
def sigmoid_loss(p: PairLogps, spec) -> "torch.Tensor":
    import torch.nn.functional as F

    h, eps = p.log_ratio_margin, spec.label_smoothing
    return -(1 - eps) * F.logsigmoid(spec.beta * h) - eps * F.logsigmoid(-spec.beta * h)


@preference_loss("ipo")
def ipo_loss(p: PairLogps, spec) -> "torch.Tensor":
    h_mean = (p.policy_chosen - p.ref_chosen) / p.n_chosen - (p.policy_rejected - p.ref_rejected) / p.n_rejected
    return (h_mean - 1 / (2 * spec.beta)) ** 2


@preference_loss("hinge")
def hinge_loss(p: PairLogps, spec) -> "torch.Tensor":
    import torch.nn.functional as F

    return F.relu(1 - spec.beta * p.log_ratio_margin)


@preference_loss("redi", reference_free=True)
def redi_loss(p: PairLogps, spec) -> "torch.Tensor":
    return -p.policy_chosen / p.n_chosen + spec.alpha * p.policy_rejected / p.n_rejected


def preference_losses(policy_c, policy_r, ref_c, ref_r, n_c, n_r, spec) -> tuple:
    """(per-pair losses, chosen rewards, rejected rewards) of the stage's `loss`, plus `nll_coef`."""
    pairs = PairLogps(policy_c, policy_r, ref_c, ref_r, n_c, n_r)
    losses = PREFERENCE_LOSSES[spec.loss].fn(pairs, spec)
    if spec.nll_coef:
        losses = losses + spec.nll_coef * (-policy_c / n_c)
    return losses, spec.beta * (policy_c - ref_c), spec.beta * (policy_r - ref_r)


def _document_sums(logits, batch) -> tuple:
    """Summed target log-probs and target counts per (row, document), both [rows, documents]."""
    import torch

    from instar.data.example import IGNORE

    targets = batch.targets
    valid = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    docs = int(batch.doc_ids.max()) + 1
    index = batch.doc_ids.clamp(min=0)
    sums = torch.zeros(targets.shape[0], docs, dtype=logp.dtype, device=logp.device).scatter_add_(1, index, logp)
    counts = torch.zeros_like(sums).scatter_add_(1, index, valid.to(logp.dtype))
    return sums, counts


def segment_logps(logits, batch) -> tuple:
    """Summed target log-probs and target counts per (chosen, rejected) pair in the batch.

    Pairs are laid out as consecutive documents (chosen = even document id, rejected = odd)."""
    sums, counts = _document_sums(logits, batch)
    pairs = counts[:, 0::2] > 0
    chosen_sum, rejected_sum = sums[:, 0::2][pairs], sums[:, 1::2][pairs]
    chosen_n, rejected_n = counts[:, 0::2][pairs], counts[:, 1::2][pairs]
    return chosen_sum, rejected_sum, chosen_n, rejected_n


def document_logps(logits, batch) -> tuple:
    """Summed target log-probs and target counts of every document of the batch, row by row and
    left to right (the order of `[ex for row in rows for ex in row]`)."""
    sums, counts = _document_sums(logits, batch)
    present = counts > 0
    return sums[present], counts[present]
