"""instar's kernels against the plain HF/torch way of doing the same thing.

    .venv/bin/python bench/kernels.py                 # CPU: fused linear + CE peak memory (RESULTS.md section)
    python bench/kernels.py --gpu --out DIR           # CUDA: memory and speed of all three (bench/gpu_check.sh)

Fused linear + cross-entropy, memory (CPU and GPU). 8,192 tokens x 32,000 vocab, hidden 1,024 (fp32 on
CPU; bf16 with hidden 4,096 on GPU). HF's way: `logits = hidden @ W.T` then
`F.cross_entropy(logits.float(), targets)`, forward and backward. instar's: `linear_cross_entropy`
(chunked, gradient written in the forward pass). Each side runs in its own fresh process; on CPU the
number is the rise of the process's resident set: VmHWM (the kernel's high-water mark) after
backward minus VmRSS once the inputs exist. Both sides hold the same inputs and end with the same
gradients, so the inputs cancel out of the rise. Target: fused <= 0.3x of HF. On GPU the same rise is
read from torch.cuda.max_memory_allocated.

GPU speed (fwd + bwd, triton.testing.do_bench median): fused RMSNorm vs HF LlamaRMSNorm at hidden
4,096 (bf16, 16,384 rows; target >= 3x); Float8Linear vs nn.Linear in bf16 at 8,192^3 (target >= 1.3x);
fused linear CE vs HF.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENS, VOCAB = 8192, 32000


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _ce_step(variant: str, hidden, weight, targets):
    import torch.nn.functional as F

    if variant == "hf":
        logits = hidden @ weight.t()
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        from instar.kernels.fused_ce import linear_cross_entropy

        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    return float(loss)


def child_ce_cpu(variant: str, hidden_size: int) -> dict:
    """One side of the CPU memory comparison, in this (fresh) process."""
    import time

    import torch

    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, hidden_size, requires_grad=True)
    weight = (torch.randn(VOCAB, hidden_size) * hidden_size ** -0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,))
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    loss = _ce_step(variant, hidden, weight, targets)
    seconds = time.perf_counter() - t0
    return {"variant": variant, "base_rss_mb": base, "peak_rss_mb": _status_mb("VmHWM"),
            "rise_mb": _status_mb("VmHWM") - base, "seconds": seconds, "loss": loss}


def ce_memory_cpu(hidden_size: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = {}
    for variant in ("hf", "fused"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--hidden", str(hidden_size)],
                              capture_output=True, text=True, env=env, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rise_ratio"] = out["fused"]["rise_mb"] / out["hf"]["rise_mb"]
    out["peak_ratio"] = out["fused"]["peak_rss_mb"] / out["hf"]["peak_rss_mb"]
    out["loss_rel_diff"] = abs(out["fused"]["loss"] - out["hf"]["loss"]) / abs(out["hf"]["loss"])
    return out


def gpu_benches() -> dict:
    import torch
    from triton.testing import do_bench
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from instar.kernels.fp8.linear import Float8Linear
    from instar.kernels.rmsnorm import FusedRMSNorm

    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name()}

    # Fused linear + CE: memory rise and time, bf16, hidden 4096.
    h = 4096
    hidden = torch.randn(TOKENS, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(VOCAB, h, device=dev) * h ** -0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), device=dev)
    ce = {}
    for variant in ("hf", "fused"):
        _ce_step(variant, hidden, weight, targets)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _ce_step(variant, hidden, weight, targets)
        torch.cuda.synchronize()
        rise = (torch.cuda.max_memory_allocated() - base) / 2**20
        hidden.grad = weight.grad = None

        def run(v=variant):
            _ce_step(v, hidden, weight, targets)
            hidden.grad = weight.grad = None

        ce[variant] = {"rise_mb": rise, "ms": do_bench(run, warmup=3, rep=30)}
    ce["rise_ratio"] = ce["fused"]["rise_mb"] / ce["hf"]["rise_mb"]
    ce["speedup"] = ce["hf"]["ms"] / ce["fused"]["ms"]
    res["fused_ce"] = ce
    del hidden, weight

    # RMSNorm fwd + bwd at hidden 4096.
    x = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    hf = LlamaRMSNorm(4096).to(dev)
    fused = FusedRMSNorm(torch.nn.Parameter(hf.weight.detach().clone()), hf.variance_epsilon)
    dy = torch.randn(16384, 4096, device=dev, dtype=torch.float32)
    rms = {}
    for name, mod in (("hf", hf), ("fused", fused)):
        def run(m=mod):
            m(x).backward(dy)
            x.grad = None
            m.weight.grad = None

        rms[name] = {"ms": do_bench(run, warmup=5, rep=50)}
    rms["speedup"] = rms["hf"]["ms"] / rms["fused"]["ms"]
    res["rmsnorm"] = rms
    del x, dy

    # FP8 linear vs bf16 linear, fwd + bwd, 8192^3.
    n = 8192
    lin = torch.nn.Linear(n, n, bias=False, device=dev, dtype=torch.bfloat16)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    lin_res = {}
    for name, mod in (("bf16", lin), ("fp8", f8)):
        def run(m=mod):
            m(x).backward(g)
            x.grad = None
            m.weight.grad = None

        def fwd(m=mod):
            with torch.no_grad():
                m(x)

        lin_res[name] = {"ms": do_bench(run, warmup=5, rep=50), "fwd_ms": do_bench(fwd, warmup=5, rep=50)}
    lin_res["speedup"] = lin_res["bf16"]["ms"] / lin_res["fp8"]["ms"]
    lin_res["fwd_speedup"] = lin_res["bf16"]["fwd_ms"] / lin_res["fp8"]["fwd_ms"]
    res["fp8_linear"] = lin_res
    return res


def table(cpu: dict | None, gpu: dict | None, hidden_size: int) -> str:
    lines = []
    if cpu:
        lines += [f"Fused linear + cross-entropy, CPU, {TOKENS:,} tokens x {VOCAB:,} vocab, hidden {hidden_size:,}, "
                  f"fp32, forward + backward (each side in a fresh process):", "",
                  "| | HF (logits + F.cross_entropy) | instar fused | ratio (target <= 0.3) |", "|---|---|---|---|",
                  f"| peak RSS rise over the inputs | {cpu['hf']['rise_mb']:,.0f} MB | {cpu['fused']['rise_mb']:,.0f} MB "
                  f"| **{cpu['rise_ratio']:.3f}** |",
                  f"| whole-process peak RSS | {cpu['hf']['peak_rss_mb']:,.0f} MB | {cpu['fused']['peak_rss_mb']:,.0f} MB "
                  f"| {cpu['peak_ratio']:.3f} |",
                  f"| time | {cpu['hf']['seconds']:.1f} s | {cpu['fused']['seconds']:.1f} s | |",
                  "", f"Loss relative difference: {cpu['loss_rel_diff']:.1e}.", ""]
    if gpu:
        ce, rms, lin = gpu["fused_ce"], gpu["rmsnorm"], gpu["fp8_linear"]
        lines += [f"GPU ({gpu['device']}), forward + backward, median ms:", "",
                  "| benchmark | baseline | instar | ratio | target |", "|---|---|---|---|---|",
                  f"| fused linear CE memory rise (bf16, hidden 4096) | {ce['hf']['rise_mb']:,.0f} MB | "
                  f"{ce['fused']['rise_mb']:,.0f} MB | {ce['rise_ratio']:.3f} | <= 0.3 |",
                  f"| fused linear CE time | {ce['hf']['ms']:.2f} | {ce['fused']['ms']:.2f} | {ce['speedup']:.2f}x | |",
                  f"| RMSNorm hidden 4096, 16384 rows bf16 | {rms['hf']['ms']:.3f} | {rms['fused']['ms']:.3f} | "
                  f"{rms['speedup']:.2f}x | >= 3x |",
                  f"| Float8Linear vs bf16 Linear, 8192^3 | {lin['bf16']['ms']:.2f} | {lin['fp8']['ms']:.2f} | "
                  f"{lin['speedup']:.2f}x | >= 1.3x |",
                  f"| (forward only) | {lin['bf16']['fwd_ms']:.2f} | {lin['fp8']['fwd_ms']:.2f} | "
                  f"{lin['fwd_speedup']:.2f}x | |", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["hf", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--gpu", action="store_true", help="also run the CUDA benchmarks")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU memory comparison")
    ap.add_argument("--out", type=Path, help="write kernels.json and kernels.md here")
    ap.add_argument("--no-results", action="store_true", help="leave bench/RESULTS.md alone")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_ce_cpu(args.child, args.hidden)))
        return
    cpu = None if args.no_cpu else ce_memory_cpu(args.hidden)
    gpu = gpu_benches() if args.gpu else None
    text = table(cpu, gpu, args.hidden)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps({"cpu": cpu, "gpu": gpu}, indent=1))
        (args.out / "kernels.md").write_text(text)
    if cpu and not gpu and not args.no_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import markers, write_section

        start, end = markers("kernels")
        write_section("kernels", f"{start}\n## Kernels (`bench/kernels.py`, {date.today()}, "
                                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n\n"
                                 f"{text}\n{end}")


if __name__ == "__main__":
    main()
