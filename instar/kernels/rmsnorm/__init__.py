"""RMSNorm (Llama's): `weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`, statistics in fp32."""

from instar.kernels.rmsnorm.op import FusedRMSNorm, rms_norm

__all__ = ["FusedRMSNorm", "rms_norm"]
