"""GPU: the fused Collage AdamW step's achieved HBM bandwidth. Target: >= 80 % of the HBM peak.

    python bench/collage_bandwidth.py [--out DIR] [--numel N]     # needs CUDA + triton (bench/gpu_check.sh)

One step over N bf16 elements (default 2^28) reads grad, hi, lo, m, v (+ v_lo for plus) and writes
hi, lo, m, v (+ v_lo): 18 bytes per element for collage-light, 22 for collage-plus (the per-block
statistics are a few bytes per 1,024 elements). Time: triton.testing.do_bench median of the kernel
alone (launch included), for the default launch (BLOCK 1,024, 4 warps) and two larger ones; the
target is judged on the default. Bandwidth = bytes / time, reported against (a) the device's datasheet HBM
peak where the name is known (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8, A100 80GB 2.0 / 40GB 1.555)
and (b) a measured device-to-device copy (`dst.copy_(src)`, 2 bytes moved per byte copied), the
practical ceiling. The target is judged against (a), or (b) when the device is not in the table.
A kernel with the step's memory traffic and no arithmetic (bench/same_streams.py) gives the
ceiling for this access pattern. For context, torch's fused fp32 AdamW step
(`torch.optim.AdamW(fused=True)`, fp32 param, grad, m, v: 28 bytes per element) is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 0.80
PEAK_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9,
            "A100-SXM4-80GB": 2.039, "A100 80GB": 1.935, "A100-SXM4-40GB": 1.555, "A100-PCIE-40GB": 1.555}


def datasheet_peak(name: str) -> float | None:
    for key, tbs in PEAK_TBS.items():
        if key.lower() in name.lower():
            return tbs * 1e12
    return None


def main() -> None:
    import torch
    import triton.testing

    from instar.kernels.collage import reference
    from instar.kernels.collage.triton import BLOCK, NUM_WARPS, collage_step_
    from same_streams import same_streams_

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=2**28)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/collage_bandwidth.py needs a CUDA GPU")
    n, dev = args.numel, "cuda"
    name = torch.cuda.get_device_name()
    scalars = reference.step_scalars(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, t=10)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3  # seconds

    src = torch.empty(n * 4, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / bench(lambda: dst.copy_(src))
    del src, dst

    results = {"device": name, "numel": n, "copy_bytes_per_s": copy_bw, "datasheet_bytes_per_s": datasheet_peak(name)}
    for variant, bytes_per in (("collage-light", 18), ("collage-plus", 22)):
        g = torch.randn(n, device=dev).to(torch.bfloat16)
        hi = torch.randn(n, device=dev).to(torch.bfloat16)
        lo, m = torch.zeros_like(hi), torch.zeros_like(hi)
        v = torch.full_like(hi, 1e-4)
        v_lo = torch.zeros_like(hi) if variant == "collage-plus" else None
        for block, warps in ((BLOCK, NUM_WARPS), (512, 4), (1024, 8), (2048, 8), (2048, 16), (4096, 8)):
            seconds = bench(lambda: collage_step_(hi, lo, g, m, v, v_lo, scalars, block=block, num_warps=warps))
            key = variant if (block, warps) == (BLOCK, NUM_WARPS) else f"{variant} (BLOCK {block}, {warps} warps)"
            results[key] = {"seconds": seconds, "bytes_per_s": bytes_per * n / seconds}
        seconds = bench(lambda: same_streams_(hi, lo, g, m, v, v_lo, BLOCK, NUM_WARPS))
        results[f"{variant} traffic alone (no arithmetic)"] = {"seconds": seconds,
                                                              "bytes_per_s": bytes_per * n / seconds}
        del g, hi, lo, m, v, v_lo
        torch.cuda.empty_cache()

    p = torch.nn.Parameter(torch.randn(n // 2, device=dev))  # fp32: half the elements fit the same memory
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    opt.step()
    seconds = bench(opt.step)
    results["torch-fused-adamw-fp32"] = {"seconds": seconds, "bytes_per_s": 28 * p.numel() / seconds,
                                         "numel": p.numel()}

    peak = results["datasheet_bytes_per_s"] or copy_bw
    lines = [f"Collage step bandwidth on {name}, {n:,} elements (target >= {TARGET:.0%} of "
             f"{'the datasheet HBM peak' if results['datasheet_bytes_per_s'] else 'the measured copy bandwidth'}):",
             f"- device-to-device copy: {copy_bw / 1e12:.2f} TB/s"
             + (f"; datasheet peak {results['datasheet_bytes_per_s'] / 1e12:.2f} TB/s" if results['datasheet_bytes_per_s'] else "")]
    ok = True
    for key in [k for k in results if isinstance(results[k], dict)]:
        r = results[key]
        r["share_of_peak"], r["share_of_copy"] = r["bytes_per_s"] / peak, r["bytes_per_s"] / copy_bw
        verdict = ""
        if key in ("collage-light", "collage-plus"):
            meets = r["share_of_peak"] >= TARGET
            ok &= meets
            verdict = " — meets the target" if meets else " — **below the target**"
        lines.append(f"- {key}: {r['seconds'] * 1e3:.3f} ms/step, {r['bytes_per_s'] / 1e12:.2f} TB/s = "
                     f"{r['share_of_peak']:.0%} of peak, {r['share_of_copy']:.0%} of copy{verdict}")
    results["meets_target"] = ok
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "collage_bandwidth.json").write_text(json.dumps(results, indent=1))
        (args.out / "collage_bandwidth.md").write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
