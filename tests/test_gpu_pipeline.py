"""Every stage kind and precision mode trains on a CUDA device (`gpu` tests: bench/gpu_check.sh).

The CPU suite never sees a second device, so these are what catch a tensor left on the CPU: the
engine moves the model to the GPU (`distributed.device: auto`), the loop moves every batch there,
and rollouts, reference log-probs, masks and collectives (NCCL under DeepSpeed) must follow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from instar.config.load import load_recipe
from instar.graph.runner import run_recipe
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent


def _post_training(recipe: dict) -> dict:
    """The tiny recipe grown to sft -> dpo (on-policy negatives) -> grpo (KL, two epochs)."""
    recipe["stages"]["dpo"] = {
        "kind": "dpo", "after": ["sft"], "beta": 0.1, "nll_coef": 1.0,
        "negatives": {"samples": 2, "temperature": 1.0, "max_new_tokens": 6, "only_mistakes": False},
        "data": {"generate": {"split": "dpo", "rows": 64}}, "train": {"steps": 3}}
    recipe["stages"]["grpo"] = {
        "kind": "grpo", "after": ["dpo"], "group_size": 4, "max_new_tokens": 6, "beta": 0.04, "epochs": 2,
        "rewards": [{"fn": "exact"}], "data": {"generate": {"split": "prompts", "rows": 64}},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum": 2}}
    return recipe


def _records(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def test_every_kind_trains_on_the_gpu(tmp_path):
    recipe = _post_training(tiny_recipe())
    recipe["defaults"]["precision"] = "bf16"  # autocast on CUDA: the packed mask in the autocast dtype
    path = write_recipe(tmp_path, recipe)
    torch.cuda.reset_peak_memory_stats()
    results = run_recipe(load_recipe(path), quiet=True)
    run_dir = load_recipe(path).run_dir
    assert sorted(r.name for r in results) == ["cpt", "dpo", "grpo", "merged", "pretrain", "sft", "sft_steps"]
    for stage in ("pretrain", "cpt", "sft", "dpo", "grpo"):
        records = _records(run_dir, stage)
        assert records and all(math.isfinite(r["loss"]) and not r["skipped"] for r in records), stage
        assert all(r["peak_mem_mb"] > 0 for r in records)  # torch.cuda.max_memory_allocated
        AutoModelForCausalLM.from_pretrained(run_dir / stage / "model")
    assert torch.cuda.max_memory_allocated() > 0
    assert "reward/mean" in _records(run_dir, "grpo")[-1] and "kl" in _records(run_dir, "grpo")[-1]
    assert list((run_dir / "dpo" / "reference_logps").glob("*.pt"))  # cached on the GPU, read back


@pytest.mark.parametrize("precision", ["bf16-pure", "fp8", "collage-light", "collage-plus"])
def test_low_precision_pretrain_on_the_gpu(tmp_path, precision):
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["model"]["config"].update(hidden_size=64, intermediate_size=128)  # FP8 GEMMs want dims % 16
    recipe["defaults"]["precision"] = precision
    recipe["defaults"].pop("eval")
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path), quiet=True)
    records = _records(load_recipe(path).run_dir, "pretrain")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    if precision == "fp8":
        assert records[-1]["fp8_gemms"] > 0
    if precision.startswith("collage"):
        assert 0 <= records[-1]["collage_lost_frac"] < 1 and records[-1]["collage_edq_share"] > 0


def test_deepspeed_zero_on_one_gpu_with_nccl(tmp_path):
    """torchrun + DeepSpeed ZeRO-2 on the GPU: NCCL collectives need device tensors (loss sums,
    GRPO reward statistics)."""
    recipe = _post_training(tiny_recipe())
    recipe["stages"] = {k: recipe["stages"][k] for k in ("pretrain", "dpo", "grpo")}  # ~25 s of startup each
    recipe["stages"]["dpo"]["after"] = recipe["stages"]["grpo"]["after"] = ["pretrain"]
    recipe["defaults"]["distributed"] = {"engine": "deepspeed", "zero_stage": 2, "nproc_per_node": 1}
    recipe["defaults"]["precision"] = "bf16"
    path = write_recipe(tmp_path, recipe)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # Output not captured here: pytest shows it on failure, and `-s` streams it (a hang shows where).
    proc = subprocess.run([sys.executable, "-m", "instar.cli", "run", str(path)], cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0
    run_dir = load_recipe(path).run_dir
    for stage in ("pretrain", "dpo", "grpo"):
        assert all(math.isfinite(r["loss"]) for r in _records(run_dir, stage)), stage
