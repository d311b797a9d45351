"""`Float8Linear`: a linear layer whose three GEMMs run in FP8 through `torch._scaled_mm`.

    forward       y  = x · Wᵀ        x, W in E4M3
    input grad    dx = dy · W        dy in E5M2 (gradients need range), W in E4M3
    weight grad   dW = dyᵀ · x       dy in E5M2, x in E4M3

Each operand is scaled tensorwise (instar.kernels.fp8). `_scaled_mm` wants its first operand
row-major and its second column-major, so the quantiser also writes the transposed copies the
backward GEMMs need (xᵀ, Wᵀ, dyᵀ). It also wants every dimension a multiple of 16: the layer's
own dims must be (see `eligible`), and the token dimension is zero-padded (zero rows change
neither products nor amaxes). The weights stay in their own dtype (fp32 masters); only the
GEMMs' operands are FP8. `GEMMS` counts FP8 GEMMs run, so a run can prove FP8 was used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instar.errors import InstarError
from instar.kernels.fp8.op import quantize
from instar.kernels.fp8.reference import E4M3, E5M2

ALIGN = 16


class GemmCounter:
    def __init__(self):
        self.total = 0


GEMMS = GemmCounter()


def eligible(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


_checked_devices: set[int] = set()


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need compute capability 8.9 (Ada) or newer on CUDA; CPU runs them (slowly)."""
    if device.type != "cuda" or device.index in _checked_devices:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise InstarError(f"precision: fp8 needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, "
                          f"Hopper or newer); {torch.cuda.get_device_name(device)} is {major}.{minor}. "
                          f"Use precision: bf16 on this GPU")
    _checked_devices.add(device.index)


def fp8_gemm(a8: torch.Tensor, a_inv: torch.Tensor, b8_colmajor: torch.Tensor, b_inv: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    GEMMS.total += 1
    return torch._scaled_mm(a8, b8_colmajor, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class AmaxHistory:
    """Delayed scaling: the scale comes from the largest amax of the last `length` uses of a tensor
    (with no history yet, from the tensor's own amax)."""

    def __init__(self, length: int):
        self.values = torch.zeros(length, device="cpu")  # explicit: layers are built under the meta device

    def max(self, device) -> torch.Tensor:
        if self.values.device != device:
            self.values = self.values.to(device)
        return self.values.max()

    def record(self, amax: torch.Tensor) -> None:
        # A non-finite amax (a step the loop will skip) must not poison the next steps' scales.
        self.values = torch.cat([torch.nan_to_num(amax.reshape(1), nan=0.0, posinf=0.0), self.values[:-1]])


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    pad = -x.shape[0] % ALIGN
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _quantize(x, dtype, transpose, history: AmaxHistory | None):
    if history is None:
        return quantize(x, dtype, transpose)
    q = quantize(x, dtype, transpose, scale_amax=history.max(x.device))
    history.record(q.amax)
    return q


class Float8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, histories):
        check_fp8_device(x.device)
        shape = x.shape
        x2 = _pad_rows(x.reshape(-1, shape[-1]))
        qx = _quantize(x2, E4M3, weight.requires_grad, histories and histories["input"])
        qw = _quantize(weight, E4M3, x.requires_grad, histories and histories["weight"])
        y = fp8_gemm(qx.data, qx.scale_inv, qw.data.t(), qw.scale_inv, out_dtype)[: x.numel() // shape[-1]]
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(qx.data_t, qx.scale_inv, qw.data_t, qw.scale_inv)
        ctx.meta = (shape, x.dtype, weight.dtype, bias is not None, histories)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_t, x_inv, w_t, w_inv = ctx.saved_tensors
        shape, x_dtype, w_dtype, has_bias, histories = ctx.meta
        n_out = dy.shape[-1]
        dy2 = dy.reshape(-1, n_out)
        rows = dy2.shape[0]
        qg = _quantize(_pad_rows(dy2.contiguous()), E5M2, True, histories and histories["grad"])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fp8_gemm(qg.data, qg.scale_inv, w_t.t(), w_inv, x_dtype)[:rows].reshape(shape)
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm(qg.data_t, qg.scale_inv, x_t.t(), x_inv, torch.float32).to(w_dtype)
        db = dy2.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


class Float8Linear(torch.nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) whose GEMMs run in FP8.

    The output dtype is the autocast dtype under autocast, else the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, amax_history_len: int = 0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        assert in_features % ALIGN == 0 and out_features % ALIGN == 0, "FP8 GEMMs need dims that are multiples of 16"
        self.amax_history_len = amax_history_len
        self.histories = ({k: AmaxHistory(amax_history_len) for k in ("input", "weight", "grad")}
                          if amax_history_len else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, amax_history_len: int = 0) -> "Float8Linear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                      amax_history_len=amax_history_len)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return Float8LinearFunction.apply(x, self.weight, self.bias, out_dtype, self.histories)

    def extra_repr(self) -> str:
        scaling = f"delayed({self.amax_history_len})" if self.amax_history_len else "dynamic"
        return f"{super().extra_repr()}, fp8 scaling={scaling}"
