"""Precision modes on the tiny pipeline's pretrain stage: final loss of each mode against bf16.

    .venv/bin/python bench/precision.py                   # every mode, the stage's own 1,000 steps
    .venv/bin/python bench/precision.py --steps 200 fp8   # a quicker look at some modes

Each mode is one run of recipes/tiny/pipeline.yaml's `pretrain` stage alone (same seed, data and
schedule), with the recipe overrides listed in MODES. The final loss is the stage's `loss` metric
(the mean of the last `log_every` steps' losses). Target: every low-precision mode ends within 2 %
of bf16's final loss. Writes its section of bench/RESULTS.md (full runs only).

To add a mode, add a line to MODES: a name and its `key=value` recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One thread: on a shared, busy machine OpenMP's spinning threads made small ops ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

RECIPE = ROOT / "recipes/tiny/pipeline.yaml"
BASELINE = "bf16"
TOLERANCE = 0.02
MODES: dict[str, list[str]] = {
    "fp32": ["defaults.precision=fp32"],
    "bf16": ["defaults.precision=bf16"],
    "bf16-pure": ["defaults.precision=bf16-pure"],  # plain bf16: bf16 weights + AdamW, no fp32 masters
    "collage-light": ["defaults.precision=collage-light"],
    "collage-plus": ["defaults.precision=collage-plus"],  # target: within 1 % of fp32 (bf16-pure is worse)
    "fp8": ["defaults.precision=fp8"],
    "fp8 + fused kernels": ["defaults.precision=fp8", "defaults.kernels.rmsnorm=true", "defaults.kernels.fused_ce=true"],
}


def run_mode(name: str, overrides: list[str], steps: int | None, workdir: Path) -> dict:
    import yaml

    from instar.config.load import load_recipe
    from instar.graph.runner import run_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["defaults"].pop("eval", None)  # loss only: the exact-match eval is the pipeline's business
    workdir.mkdir(parents=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    slug = "".join(c if c.isalnum() else "-" for c in name)
    extra = [f"run.output_dir={workdir / 'runs'}", f"run.name={slug}"] + ([f"stages.pretrain.train.steps={steps}"]
                                                                             if steps else [])
    t0 = time.perf_counter()
    run_recipe(load_recipe(path, overrides + extra), quiet=True)
    stage = workdir / "runs" / slug / "pretrain"
    meta = json.loads((stage / "model/instar.json").read_text())
    records = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    out = {"mode": name, "overrides": overrides, "final_loss": meta["metrics"]["loss"], "steps": len(records),
           "seconds": time.perf_counter() - t0, "tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records)}
    if "fp8_gemms" in records[-1]:
        out["fp8_gemms_per_step"] = records[-1]["fp8_gemms"]
    return out


def table(rows: list[dict]) -> str:
    base = next((r["final_loss"] for r in rows if r["mode"] == BASELINE), None)
    fp32 = next((r["final_loss"] for r in rows if r["mode"] == "fp32"), None)
    lines = ["| mode | final loss | vs bf16 | within 2 % | vs fp32 | FP8 GEMMs / step | tokens/s | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = (r["final_loss"] - base) / base if base else float("nan")
        ok = "yes" if abs(rel) <= TOLERANCE else "**no**"
        vs32 = f"{(r['final_loss'] - fp32) / fp32:+.2%}" if fp32 else ""
        lines.append(f"| {r['mode']} | {r['final_loss']:.4f} | {rel:+.2%} | {ok if base else ''} | {vs32} | "
                     f"{r.get('fp8_gemms_per_step', '')} | {r['tokens_per_s']:,.0f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modes", nargs="*", help=f"modes to run (default: all of {', '.join(MODES)})")
    ap.add_argument("--steps", type=int, help="override the stage's steps (no RESULTS.md then)")
    ap.add_argument("--out", type=Path, help="also write precision.json and precision.md here")
    args = ap.parse_args()
    names = args.modes or list(MODES)
    unknown = [n for n in names if n not in MODES]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; known: {list(MODES)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_mode(name, MODES[name], args.steps, Path(tmp) / f"m{len(rows)}"))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "precision.json").write_text(json.dumps(rows, indent=1))
        (args.out / "precision.md").write_text(text + "\n")
    if not args.steps and not args.modes:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import markers, write_section

        start, end = markers("precision")
        write_section("precision", f"{start}\n## Precision modes (`bench/precision.py`, {date.today()}, "
                                   f"{platform.machine()}, {os.cpu_count()} cores)\n\nThe tiny pipeline's pretrain "
                                   f"stage alone, each mode from the same seed; target: within 2 % of bf16.\n\n"
                                   f"{text}\n{end}")


if __name__ == "__main__":
    main()
