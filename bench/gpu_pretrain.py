"""Tokens/s, MFU and peak memory of a ~1.1B Llama pretrain stage in each precision mode, on one GPU.

    python bench/gpu_pretrain.py --out results/              # bf16, fp8, collage-light, collage-plus
    python bench/gpu_pretrain.py --steps 20 bf16 fp8         # some modes, fewer steps
    python bench/gpu_pretrain.py --tiny --steps 6            # the same code path on a CPU, tiny model

Each mode is `instar run recipes/llama-1b/pretrain.yaml` in its own process (so one mode's memory
never counts against the next), on a JSONL of long documents this script writes (each longer than
seq_len: every row is one document, so attention is plain causal and SDPA can take its flash
kernel). Figures are medians over the steps after `--warmup` (Triton compiles, the allocator
grows); tokens/s and MFU are the loop's own `metrics.jsonl` fields. Writes gpu_pretrain.json and
gpu_pretrain.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/llama-1b/pretrain.yaml"
MODES: dict[str, list[str]] = {
    "bf16": ["defaults.precision=bf16"],              # fp32 master weights, bf16 autocast
    "fp8": ["defaults.precision=fp8"],                # FP8 linears (tensorwise dynamic scaling)
    "fp8 + fused kernels": ["defaults.precision=fp8", "defaults.kernels.rmsnorm=true", "defaults.kernels.fused_ce=true"],
    "collage-light": ["defaults.precision=collage-light"],  # bf16 weights, no fp32 copy
    "collage-plus": ["defaults.precision=collage-plus"],
}
DEFAULT_MODES = ["bf16", "fp8", "collage-light", "collage-plus"]
TINY = ["model.config.vocab_size=512", "model.config.hidden_size=128", "model.config.intermediate_size=256",
        "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
        "model.config.num_key_value_heads=2", "defaults.train.seq_len=128", "defaults.train.micro_batch_size=2"]


def write_documents(path: Path, n: int, chars: int, seed: int = 0) -> None:
    """`n` documents of about `chars` characters of arithmetic lines (any text would do: this
    measures speed, not learning)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            lines, size = [], 0
            while size < chars:
                a, b = rng.randrange(1000), rng.randrange(1000)
                lines.append(f"{a}+{b}={a + b}")
                size += len(lines[-1]) + 1
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")


def run_mode(name: str, overrides: list[str], workdir: Path, data: Path, steps: int, warmup: int) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name)
    cmd = [sys.executable, "-m", "instar.cli", "run", str(RECIPE), *overrides, f"run.output_dir={workdir}",
           f"run.name={slug}", f"stages.pretrain.data.path={data}", f"stages.pretrain.train.steps={steps}",
           "stages.pretrain.train.checkpoint_every=0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        return {"mode": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    records = [json.loads(x) for x in (workdir / slug / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    timed = records[warmup:] or records

    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"mode": name, "overrides": overrides, "steps": len(records), "timed_steps": len(timed),
            "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"), "tflops": median("tflops"),
            "peak_mem_gib": max(r["peak_mem_mb"] for r in records) / 1024,
            "fp8_gemms_per_step": records[-1].get("fp8_gemms"), "final_loss": records[-1]["loss"],
            "seconds": seconds}


def table(rows: list[dict], device: str) -> str:
    base = next((r["tokens_per_s"] for r in rows if r["mode"] == "bf16" and "error" not in r), None)
    lines = [f"Device: {device}. Model: recipes/llama-1b/pretrain.yaml (~1.1B parameters), micro-batch 4 x 2048 tokens.",
             "", "| mode | tokens/s | vs bf16 | MFU | TFLOP/s | peak memory | FP8 GEMMs / step | loss at end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        tflops = f"{r['tflops']:.0f}" if r["tflops"] is not None else "n/a"
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {rel} | {mfu} | {tflops} | {r['peak_mem_gib']:.1f} GiB | "
                     f"{r['fp8_gemms_per_step'] or ''} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modes", nargs="*", help=f"modes (default: {' '.join(DEFAULT_MODES)}; known: {list(MODES)})")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    ap.add_argument("--out", type=Path, help="write gpu_pretrain.json and gpu_pretrain.md here")
    args = ap.parse_args()
    names = args.modes or DEFAULT_MODES
    unknown = [n for n in names if n not in MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; known: {list(MODES)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures a GPU (use --tiny to check the script on a CPU)")
    device = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name()
    extra = TINY + ["defaults.distributed.device=cpu"] if args.tiny else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.jsonl"
        write_documents(data, n=64 if args.tiny else 2000, chars=400 if args.tiny else 3000)
        for name in names:
            rows.append(run_mode(name, MODES[name] + extra, Path(tmp) / "runs", data, args.steps, args.warmup))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # after every mode: a time limit that stops the script keeps what was measured
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_pretrain.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
                (args.out / "gpu_pretrain.md").write_text(table(rows, device) + "\n")
    print(table(rows, device))
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
