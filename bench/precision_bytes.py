"""Bytes per parameter of each precision mode: parameters + gradients + optimizer state actually held.

    .venv/bin/python bench/precision_bytes.py            # single process + ZeRO-1/2/3 on 2 ranks (~4 min)
    .venv/bin/python bench/precision_bytes.py --no-zero  # single process only; leaves RESULTS.md alone

Counted while all three exist (after a backward that follows a first optimizer step), by distinct
tensor storage, divided by the model's parameter count (the tiny pipeline's model, 0.4 M params).
Single engine: the model's parameters, their gradients and the optimizer's state. DeepSpeed ZeRO
on 2 ranks (torchrun, gloo), per rank: the module's parameters (ZeRO-3: this rank's shards), the
gradients, every tensor the DeepSpeed ZeRO optimizer object holds in its attributes (flat buffers,
its own bf16 or fp32 copy of the partition, gradient partitions) and the client optimizer's state.
ZeRO-3 runs with stage3_param_persistence_threshold 0 (else every tensor of this small model stays
whole on every rank). ZeRO-1 and ZeRO-2 come out the same: at the step boundary, where this counts,
DeepSpeed's stage-1 code also holds only this rank's reduced gradient partition (`averaged_gradients`)
and no full gradients. Measured breakdown, collage-plus ZeRO-2 rank 0: full bf16 params 2.0 + bf16
partition copy 1.0 + gradient partition 1.02 + Collage state (lo, m, v, v_lo) 4.0 = 8.02.
Targets (single process): collage-light 10, collage-plus 12 vs 16 for fp32-master AdamW (`bf16`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRECISIONS = ["fp32", "bf16", "bf16-pure", "collage-light", "collage-plus"]
MEANING = {"fp32": "fp32 weights, AdamW", "bf16": "fp32 weights + bf16 autocast, AdamW",
           "bf16-pure": "bf16 weights + AdamW, no masters", "collage-light": "bf16 weights + Collage (lo)",
           "collage-plus": "bf16 weights + Collage (lo, v as two bf16)"}
ZERO_STAGES = (1, 2, 3)
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _storages(obj, seen: dict, depth: int = 0) -> None:
    """Every distinct tensor storage reachable through lists, tuples and dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.numel() > 0:
            st = obj.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, depth + 1)


def held_bytes(module, optimizers) -> int:
    """Parameters (ZeRO-3: this rank's shards), their gradients, and every tensor the optimizer
    objects hold in their state and attributes, each storage once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        _storages(p.ds_tensor if hasattr(p, "ds_tensor") else p, seen)
        if p.grad is not None:
            _storages(p.grad, seen)
    for opt in optimizers:
        _storages(dict(getattr(opt, "state", {})), seen)
        for value in vars(opt).values():
            _storages(value, seen)
    return sum(seen.values())


def _spec(precision: str, engine: str = "single", zero: int = 2):
    import yaml

    from instar.config.load import load_recipe
    from instar.config.resolve import resolve_stage

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / "pipeline.yaml").read_text())
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["defaults"].pop("eval", None)
    recipe["defaults"]["precision"] = precision
    recipe["defaults"]["distributed"] = {"engine": engine, "zero_stage": zero,
                                         "nproc_per_node": 1 if engine == "single" else 2}
    if zero == 3:  # by default ZeRO-3 keeps tensors under 1e5 elements whole: all of this tiny model's
        recipe["defaults"]["distributed"]["deepspeed_config"] = {
            "zero_optimization": {"stage3_param_persistence_threshold": 0}}
    folder = Path(tempfile.mkdtemp())
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(folder / "r.yaml")
    return loaded, resolve_stage(loaded.recipe, "pretrain")


def _model(loaded):
    from instar.data.tokenizer import load_tokenizer
    from instar.models.build import model_from_config

    return model_from_config(loaded.recipe.model.config, load_tokenizer("instar-char", ROOT), seed=0)


def _fwd_bwd(engine, vocab: int) -> None:
    import torch

    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    with engine.autocast():
        loss = engine.model(input_ids=ids, labels=ids).loss
    engine.backward(loss)


def bytes_single(precision: str) -> float:
    from instar.trainer.batch import batch_layout
    from instar.trainer.single_engine import SingleEngine

    loaded, spec = _spec(precision)
    model = _model(loaded)
    n = sum(p.numel() for p in model.parameters())
    engine = SingleEngine(model, spec)
    assert batch_layout(spec.train, 1).grad_accum == 1
    _fwd_bwd(engine, model.config.vocab_size)
    engine.step(1e-4)
    _fwd_bwd(engine, model.config.vocab_size)  # parameters, gradients and state all live now
    return held_bytes(engine.model, [engine.optimizer]) / n


def bytes_rank_main(precision: str, zero: int) -> None:
    """torchrun worker: print this rank's bytes per parameter under DeepSpeed ZeRO."""
    import torch.distributed as dist

    from instar.trainer.batch import batch_layout
    from instar.trainer.deepspeed_engine import DeepSpeedEngine

    loaded, spec = _spec(precision, "deepspeed", zero)
    model = _model(loaded)
    n = sum(p.numel() for p in model.parameters())
    layout = batch_layout(spec.train, 2)
    engine = DeepSpeedEngine(model, spec, layout, "pretrain")
    for i in range(2):
        for _ in range(layout.grad_accum):
            _fwd_bwd(engine, model.config.vocab_size)
        if i == 0:
            engine.step(1e-4)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, held_bytes(engine.ds.module, [engine.ds.optimizer, engine._client_optimizer]) / n)
    if dist.get_rank() == 0:  # one printer: the ranks' stdout would interleave
        print("BYTES " + " ".join(f"{b:.4f}" for b in held), flush=True)
    engine.step(1e-4)


def bytes_zero(precision: str, zero: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(Path(__file__).resolve()), "--bytes-rank", precision,
                           str(zero)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BYTES ")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"ZeRO-{zero} {precision}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return [float(b) for b in lines[0].split()[1:]]


def table(single: dict[str, float], zero: dict[str, dict[int, list[float]]]) -> str:
    stages = sorted({s for per in zero.values() for s in per})
    lines = ["| precision | what it holds | single process | " + " | ".join(f"ZeRO-{s}, 2 ranks (rank 0 / 1)"
                                                                           for s in stages) + " |",
             "|---|---|---|" + "---|" * len(stages)]
    for precision, value in single.items():
        cells = [" / ".join(f"{b:.2f}" for b in zero.get(precision, {}).get(s, [])) for s in stages]
        lines.append(f"| {precision} | {MEANING[precision]} | **{value:.2f}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-zero", action="store_true", help="single process only (no RESULTS.md then)")
    ap.add_argument("--bytes-rank", nargs=2, metavar=("PRECISION", "ZERO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bytes_rank:
        bytes_rank_main(args.bytes_rank[0], int(args.bytes_rank[1]))
        return
    single = {p: bytes_single(p) for p in PRECISIONS}
    print("single process:", json.dumps({k: round(v, 3) for k, v in single.items()}), flush=True)
    zero: dict[str, dict[int, list[float]]] = {}
    if not args.no_zero:
        for precision in PRECISIONS:
            for stage in ZERO_STAGES:
                zero.setdefault(precision, {})[stage] = bytes_zero(precision, stage)
                print(f"ZeRO-{stage} {precision}: {zero[precision][stage]}", flush=True)
    text = table(single, zero)
    print(text)
    if not args.no_zero:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import markers, write_section

        start, end = markers("precision-bytes")
        write_section("precision-bytes", f"{start}\n## Bytes per parameter held (`bench/precision_bytes.py`, "
                                         f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores)\n\n"
                                         f"Parameters + gradients + optimizer state, counted by distinct storage "
                                         f"while all three exist. Under ZeRO, per rank, DeepSpeed's own buffers "
                                         f"and partition copies included. Target: collage-light 10, collage-plus "
                                         f"12 vs 16 for fp32-master AdamW.\n\n{text}\n{end}")


if __name__ == "__main__":
    main()
