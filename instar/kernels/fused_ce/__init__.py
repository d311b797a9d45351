"""Linear + cross-entropy fused: the LM head's logits are made chunk by chunk and never kept."""

from instar.kernels.fused_ce.op import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
