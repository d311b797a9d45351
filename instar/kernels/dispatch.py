"""Choose between an op's Triton fast path and its plain-torch reference.

Each op lives in `instar/kernels/<op>/` with `reference.py` (the specification) and `triton.py`.
Triton runs on CUDA tensors; everywhere else the reference runs. `INSTAR_KERNELS=reference` or
`INSTAR_KERNELS=triton` forces one (forcing triton on CPU needs TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import importlib.util
import os

from instar.errors import InstarError

BACKENDS = ("reference", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_backend(on_cuda: bool, env: dict[str, str] | None = None) -> str:
    """`reference` or `triton` for tensors that are (or are not) on a CUDA device."""
    env = os.environ if env is None else env
    forced = env.get("INSTAR_KERNELS", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise InstarError(f"INSTAR_KERNELS={forced!r}: use one of {', '.join(BACKENDS)} (or unset it)")
    if forced == "triton":
        if not triton_available():
            raise InstarError("INSTAR_KERNELS=triton but triton is not installed: pip install 'instar[gpu]'")
        if not on_cuda and env.get("TRITON_INTERPRET") != "1":
            raise InstarError("INSTAR_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's "
                              "interpreter); without it Triton kernels only run on CUDA")
        return "triton"
    if forced == "reference":
        return "reference"
    return "triton" if on_cuda and triton_available() else "reference"


_announced: set[tuple[str, str]] = set()


def announce_fallback(op: str, why: str) -> None:
    """Say once per (op, reason) that the reference runs where the Triton path was chosen:
    a slower kernel should never be silent."""
    if (op, why) in _announced:
        return
    _announced.add((op, why))
    import warnings

    warnings.warn(f"instar kernel '{op}': using the plain-torch reference ({why})", RuntimeWarning, stacklevel=3)
