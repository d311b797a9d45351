"""Resume restores the global RNG: with attention dropout every step draws from it, so a stage
resumed from a checkpoint reproduces the uninterrupted one only if the draws go on where they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from instar.config.load import load_recipe
from instar.graph.runner import run_recipe
from tests.conftest import tiny_recipe, write_recipe


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_dropout_continues_the_random_draws(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 6, "checkpoint_every": 3}
    recipe["defaults"]["eval"] = {}
    recipe["model"]["config"]["attention_dropout"] = 0.5
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path), quiet=True)
    stage = tmp_path / "runs" / "t" / "pretrain"
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step-00000003"]
    first, losses = load_file(str(stage / "model" / "model.safetensors")), _losses(stage)

    shutil.rmtree(stage / "model")  # as if killed after the step-3 checkpoint
    torch.manual_seed(1234)  # whatever this process drew since: the checkpoint's state must replace it
    run_recipe(load_recipe(path), quiet=True)
    second = load_file(str(stage / "model" / "model.safetensors"))
    assert _losses(stage) == losses
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
