"""The reference model at scale (2 CPU ranks under torchrun): under ZeRO-3 the dpo / grpo reference
is partitioned like the policy (`<stage>/reference.json` records the bytes each rank holds), and
the reference log-prob cache and on-policy negatives are computed by every rank on its slice,
with the same results as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_recipe
from tests.test_distributed import _losses, _recipe, _run

pytestmark = pytest.mark.dist

ONE = ["defaults.distributed.engine=single", "defaults.distributed.nproc_per_node=1"]


def _zero3(recipe: dict) -> dict:
    """ZeRO-3 that really partitions the tiny model (by default DeepSpeed keeps parameters under
    100k elements whole on every rank)."""
    recipe["defaults"]["distributed"].update(zero_stage=3, deepspeed_config={
        "zero_optimization": {"stage3_param_persistence_threshold": 0}})
    return recipe


def _reference_bytes(run: Path, stage: str) -> list[int]:
    return json.loads((run / stage / "reference.json").read_text())["bytes_per_rank"]


def _cache(run: Path) -> torch.Tensor:
    (path,) = (run / "dpo" / "reference_logps").glob("sft-*.pt")
    return torch.load(path, weights_only=True)


def test_dpo_zero3_reference_is_partitioned_and_cache_and_negatives_split_over_ranks(tmp_path: Path):
    recipe = _zero3(_recipe(steps=3))
    recipe["stages"]["dpo"] = {"kind": "dpo", "after": ["sft"], "data": {"generate": {"split": "dpo", "rows": 37}},
                               "negatives": {"samples": 2, "max_new_tokens": 4}, "train": {"steps": 3}}
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet", "run.name=one", *ONE, "defaults.train.micro_batch_size=8"], tmp_path)
    _run(["run", str(path), "--quiet", "run.name=two"], tmp_path)
    _run(["run", str(path), "--quiet", "run.name=fly", "stages.dpo.reference_logps=on_the_fly"], tmp_path)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    # 37 rows: rank 1's slice is padded (19 + 18), and rows keep their dataset order.
    assert (two / "dpo" / "pairs.jsonl").read_text() == (one / "dpo" / "pairs.jsonl").read_text()
    torch.testing.assert_close(_cache(two), _cache(one), atol=1e-5, rtol=1e-5)
    assert _losses(two, "dpo") == pytest.approx(_losses(one, "dpo"), rel=1e-5)
    (whole,), halves = _reference_bytes(one, "dpo"), _reference_bytes(two, "dpo")
    assert len(halves) == 2 and all(abs(h - whole / 2) < 0.02 * whole for h in halves), (whole, halves)
    # the partitioned reference on each micro-batch (forwards as collectives) gives the same losses
    assert _losses(tmp_path / "runs" / "fly", "dpo") == pytest.approx(_losses(one, "dpo"), rel=1e-5)


def test_grpo_zero3_reference_is_partitioned_and_matches_one_process(tmp_path: Path):
    recipe = _zero3(_recipe(steps=3))
    recipe["stages"]["grpo"] = {
        "kind": "grpo", "after": ["sft"], "data": {"generate": {"split": "prompts", "rows": 32}},
        "group_size": 4, "max_new_tokens": 6, "beta": 0.5, "temperature": 2.0,
        "rewards": [{"fn": "tests.grpo_rewards:ones"}, {"fn": "format", "weight": 0.5}],
        "train": {"steps": 3, "micro_batch_size": 2, "lr": 1e-2}}
    for stage in ("pretrain", "sft"):  # the same starting policy in both runs, bit for bit
        recipe["stages"][stage]["distributed"] = {"engine": "single", "nproc_per_node": 1}
        recipe["stages"][stage]["train"]["micro_batch_size"] = 8
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet", "run.name=one", "stages.grpo.distributed.engine=single",
          "stages.grpo.distributed.nproc_per_node=1", "stages.grpo.train.micro_batch_size=4"], tmp_path)
    _run(["run", str(path), "--quiet", "run.name=two"], tmp_path)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    last = json.loads((one / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kl"] > 0  # the policy has moved off the reference: beta * kl is most of that loss
    # (kl itself is rank 0's share of the step, so only the losses compare)
    assert _losses(two, "grpo") == pytest.approx(_losses(one, "grpo"), rel=1e-5, abs=1e-9)
    (whole,), halves = _reference_bytes(one, "grpo"), _reference_bytes(two, "grpo")
    assert len(halves) == 2 and all(abs(h - whole / 2) < 0.02 * whole for h in halves), (whole, halves)
