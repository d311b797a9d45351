"""The dpo reference at scale on this CPU: reference bytes held per rank under ZeRO-3, and the
wall time of the reference log-prob cache, on 1 and 2 ranks.

    .venv/bin/python bench/reference_scale.py --write     # ~26 M-parameter Llama, 512 pairs; adds its section
    .venv/bin/python bench/reference_scale.py --tiny      # a smoke run of a small model; leaves RESULTS.md alone

One recipe: a `pretrain` stage of one step (one process) makes the reference, then two `dpo` stages
after it, each one optimizer step on DeepSpeed ZeRO-3 (gloo, DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1
per rank, stage3_param_persistence_threshold 0, fp32): `dpo_1` on 1 rank, `dpo_2` on 2 ranks
(torchrun). Each rank computes the reference log-probs of its slice of the pairs and the slices
are gathered (instar/trainer/reference_cache.py).
- bytes per rank: `<stage>/reference.json` (the reference's ZeRO-3 partitions each rank holds,
  instar/trainer/frozen.py bytes_held);
- cache build: the time rank 0 prints for computing the cache, from loading and partitioning the
  reference to the gathered tensor written to disk, and the loading part of it (the stage's
  "reference log-probs of N pairs computed on W rank(s) in S s (L s of it loading the reference)").
Two ranks on a 2-core machine shared with other work measure the split only if the cores are free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import yaml

from results import markers, write_section  # bench/results.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
START, END = markers("reference_scale")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "COLUMNS": "400"}  # rich wraps printed lines at 80 columns otherwise, cutting the line parsed below

MODELS = {  # instar-char vocabulary; tied embeddings
    "full": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def recipe(folder: Path, model: dict, pairs: int) -> dict:
    zero3 = {"engine": "deepspeed", "zero_stage": 3,
             "deepspeed_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
    dpo = {"kind": "dpo", "after": ["pretrain"], "data": {"generate": {"split": "dpo", "rows": pairs}},
           "train": {"steps": 1, "micro_batch_size": 2}}
    return {
        "run": {"name": "bench", "output_dir": str(folder / "runs"), "seed": 0},
        "model": {"tokenizer": "instar-char",
                  "config": {"model_type": "llama", **model, "num_key_value_heads": model["num_attention_heads"],
                             "max_position_embeddings": 128, "tie_word_embeddings": True}},
        "defaults": {"train": {"micro_batch_size": 4, "seq_len": 64, "lr": 1e-3, "checkpoint_every": 0}, "eval": {}},
        "stages": {
            "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 64}},
                         "train": {"steps": 1}},
            "dpo_1": {**dpo, "distributed": {**zero3, "nproc_per_node": 1}},
            "dpo_2": {**dpo, "distributed": {**zero3, "nproc_per_node": 2},  # the same global batch of 2 pairs
                      "train": {"steps": 1, "micro_batch_size": 1}},
        },
    }


def measure(model: dict, pairs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(folder, model, pairs), sort_keys=False))
        proc = subprocess.run([sys.executable, "-m", "instar.cli", "run", str(path)], cwd=ROOT, env=ENV,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"instar run failed with code {proc.returncode}:\n{proc.stdout[-4000:]}")
        run = folder / "runs" / "bench"
        out = {"hidden": model["hidden_size"], "layers": model["num_hidden_layers"], "pairs": pairs}
        for world in (1, 2):
            stage = f"dpo_{world}"
            seconds = re.search(rf"\[{stage}\] reference log-probs of \d+ pairs computed on {world} rank\(s\) in "
                                rf"([\d.]+) s \(([\d.]+) s of it loading", proc.stdout)
            if seconds is None:
                sys.exit(f"{stage} printed no cache time:\n{proc.stdout[-4000:]}")
            out[world] = {"bytes_per_rank": json.loads((run / stage / "reference.json").read_text())["bytes_per_rank"],
                          "cache_s": float(seconds.group(1)), "load_s": float(seconds.group(2))}
        out["params"] = out[1]["bytes_per_rank"][0] // 4  # one rank holds the whole fp32 reference
        return out


def table(res: dict) -> str:
    lines = ["| ranks | reference MiB per rank (ZeRO-3, fp32) | share of the whole | cache build s | of it loading s "
             "| speed-up |", "|---|---|---|---|---|---|"]
    whole = res["params"] * 4
    for world in (1, 2):
        held = res[world]["bytes_per_rank"]
        lines.append(f"| {world} | {' / '.join(f'{b / 2**20:.1f}' for b in held)} | "
                     f"{max(held) / whole:.3f} | {res[world]['cache_s']:.2f} | {res[world]['load_s']:.2f} | "
                     f"{res[1]['cache_s'] / res[world]['cache_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model, to check the script works")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs (default 512; --tiny 64)")
    parser.add_argument("--write", action="store_true", help="add the section to bench/RESULTS.md")
    args = parser.parse_args()
    pairs = args.pairs or (64 if args.tiny else 512)
    res = measure(MODELS["tiny" if args.tiny else "full"], pairs)
    body = table(res)
    print(f"Llama {res['params'] / 1e6:.1f} M parameters (hidden {res['hidden']}, {res['layers']} layers), "
          f"{res['pairs']} pairs\n{body}")
    if args.write:
        if args.tiny:
            sys.exit("--tiny numbers are a smoke test; not written")
        section = (f"{START}\n## The dpo reference at scale (`bench/reference_scale.py`, {date.today()}, "
                   f"{platform.machine()}, {os.cpu_count()} cores)\n\n"
                   f"Llama {res['params'] / 1e6:.1f} M parameters (hidden {res['hidden']}, {res['layers']} layers, "
                   f"fp32), {res['pairs']} preference pairs, DeepSpeed ZeRO-3 on gloo, one thread per rank. "
                   f"Cache build: loading and partitioning the reference, each rank's log-probs of its slice of "
                   f"the pairs, the gather and the write, timed on rank 0.\n\n{body}\n{END}")
        write_section("reference_scale", section)
        print("written to bench/RESULTS.md")


if __name__ == "__main__":
    main()
