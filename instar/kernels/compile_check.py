"""Compile every instar Triton kernel for a GPU target, on a machine without a GPU.

    python -m instar.kernels.compile_check            # sm_90 (H100/H200), down to cubin
    python -m instar.kernels.compile_check --arch 80
    python -m instar.kernels.compile_check --sass     # + each launch's SASS instruction count

Triton's interpreter (how the CPU tests run the kernels) does not apply the compiler's rules: a
module-level float used inside a kernel ran under the interpreter and failed to compile on an H200
(2026-11-27). This runs each op's real launch path with CPU tensors, but every launch compiles the
kernel with the exact arguments and constexprs the GPU would get (Triton's own front end, then
ptxas) instead of running it. TRITON_INTERPRET must be unset: it is removed before triton loads.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv",
                torch.float8_e5m2: "fp8e5"}
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _divisible_by_16(value) -> bool:
    """The alignment a real launch specializes on: 16-byte aligned pointers and ints divisible by
    16 compile with `tt.divisibility = 16`, which is what lets Triton vectorize loads and stores."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def compiling_launches(arch: int):
    """Patch JITFunction.run so that a launch compiles for `arch` instead of running; returns the
    list the (kernel name, compiled kernel) of each launch is appended to."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    compiled: list[tuple[str, object]] = []
    target = GPUTarget("cuda", arch, 32)

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
        values = dict(zip(self.arg_names, args)) | kwargs
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(self.params):
            value = values.get(param.name, param.default)
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = value
            else:
                signature[param.name] = _arg_type(value)
                if _divisible_by_16(value) and not param.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options)
        compiled.append((self.__name__, kernel))

    JITFunction.run = run
    return compiled


def sass_instructions(cubin: bytes) -> int:
    """Static SASS instruction count of a cubin (cuobjdump from Triton's own CUDA tools)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    # instruction lines look like: /*0040*/   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;   /* 0x... */
    return sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and line.count("/*") == 2)


def exercise_every_op() -> None:
    """Call each op's public entry the way the trainer does, in every dtype it supports."""
    from instar.kernels.collage.reference import step_scalars
    from instar.kernels.collage.triton import collage_step_
    from instar.kernels.fp8.reference import E4M3, E5M2
    from instar.kernels.fp8.triton import quantize
    from instar.kernels.fused_ce.triton import cross_entropy_grad_
    from instar.kernels.rmsnorm.triton import rms_norm

    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(64, 48, dtype=dtype)
        for fp8 in (E4M3, E5M2):
            quantize(x, fp8, transpose=True)
            quantize(x, fp8, transpose=False, scale_amax=torch.tensor(1.0))
        cross_entropy_grad_(torch.randn(8, 1000, dtype=dtype), torch.randint(0, 1000, (8,)), -100)
        h = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        rms_norm(h, torch.ones(256, dtype=dtype), 1e-6).sum().backward()
    scalars = step_scalars(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, t=1)
    for numel in (1000, 4096):  # a ragged size, and one divisible by 16 (vectorized loads, as in training)
        p = torch.randn(numel, dtype=torch.bfloat16)
        for v_lo in (None, torch.zeros_like(p)):
            collage_step_(p, torch.zeros_like(p), torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p),
                          v_lo, scalars)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    ap.add_argument("--sass", action="store_true", help="print each launch's static SASS instruction count")
    args = ap.parse_args(argv)
    compiled = compiling_launches(args.arch)
    exercise_every_op()
    if args.sass:
        for name, kernel in compiled:
            print(f"{name}: {sass_instructions(kernel.asm['cubin'])} SASS instructions")
    kernels = sorted({name for name, _ in compiled})
    print(f"compiled {len(compiled)} launches of {len(kernels)} kernels for sm_{args.arch}: {', '.join(kernels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
