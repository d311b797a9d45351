"""Kernels: one folder per op, `reference.py` (plain torch, the spec) + `triton.py` (fast path),
picked by `instar.kernels.dispatch.kernel_backend`."""
