"""`precision: collage-plus` end to end: a tiny pretrain stage on the single engine (exact resume,
bf16 weights, descent metrics) and on 2 ranks under DeepSpeed ZeRO, where each rank holds 1/world
of the optimizer state and no fp32 tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.config.load import load_recipe
from instar.config.resolve import resolve_stage
from instar.errors import RecipeError
from instar.graph.runner import run_recipe
from instar.trainer.batch import batch_layout
from instar.trainer.deepspeed_config import deepspeed_config
from tests.conftest import tiny_recipe, write_recipe
from tests.test_distributed import _run


def _recipe(steps: int = 6, **distributed) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps, "checkpoint_every": 3, "keep_checkpoints": 1}
    recipe["defaults"]["eval"] = {}
    recipe["defaults"]["precision"] = "collage-plus"
    if distributed:
        recipe["defaults"]["distributed"] = {"engine": "deepspeed", "nproc_per_node": 2, **distributed}
    return recipe


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """collage-plus in one process, global batch 8 (what 2 ranks x 4 rows make)."""
    folder = tmp_path_factory.mktemp("collage-single")
    path = write_recipe(folder, _recipe())
    run_recipe(load_recipe(path, ["defaults.train.micro_batch_size=8"]), quiet=True)
    return folder / "runs" / "t"


def test_single_engine_trains_bf16_weights_with_descent_metrics(single_run: Path):
    records = _records(single_run)
    assert records[-1]["loss"] < records[0]["loss"]
    for r in records:
        assert 0.99 < r["collage_edq_share"] < 1.01 and 0 <= r["collage_lost_frac"] < 0.01
        assert r["collage_edq"] > 0
    weights = load_file(str(single_run / "pretrain" / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    optim = torch.load(next((single_run / "pretrain" / "checkpoints").glob("*/optimizer.pt")), weights_only=True)
    state = [t for s in optim["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert state and {t.dtype for t in state} == {torch.bfloat16}  # lo, m, v, v_lo: no fp32 anywhere
    # plus: lo, m, v and v's low part, 2 bytes each, for every parameter
    n_params = sum(t.numel() for t in weights.values())
    assert records[-1]["optim_state_mb"] * 2**20 == 8 * n_params


def test_single_engine_resume_is_exact(single_run: Path, tmp_path: Path):
    """Kill-free resume: drop the finished artifact and re-run from the step-3 checkpoint."""
    copy = tmp_path / "t"
    shutil.copytree(single_run, copy)
    shutil.rmtree(copy / "pretrain" / "model")
    recipe = _recipe()
    recipe["run"]["output_dir"] = str(tmp_path)
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path, ["defaults.train.micro_batch_size=8"]), quiet=True)
    a = load_file(str(single_run / "pretrain" / "model" / "model.safetensors"))
    b = load_file(str(copy / "pretrain" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _records(copy)] == [r["loss"] for r in _records(single_run)]


def _spec(tmp_path: Path, stage: int, *overrides: str):
    recipe = _recipe(zero_stage=stage)
    loaded = load_recipe(write_recipe(tmp_path, recipe), list(overrides))
    return resolve_stage(loaded.recipe, "pretrain")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_keeps_no_fp32_masters(tmp_path: Path, stage: int):
    spec = _spec(tmp_path, stage)
    bf16 = deepspeed_config(spec, batch_layout(spec.train, 2), "pretrain")["bf16"]
    if stage == 0:  # DeepSpeed refuses the flags at stage 0; instar casts the module itself there
        assert bf16 == {"enabled": False}
    else:
        assert bf16 == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def test_configs_that_keep_fp32_masters_are_refused(tmp_path: Path):
    spec = _spec(tmp_path, 1, "defaults.distributed.deepspeed_config.data_types.grad_accum_dtype=fp32")
    with pytest.raises(RecipeError, match="grad_accum_dtype='fp32' with precision 'collage-plus'.*fp32 master"):
        deepspeed_config(spec, batch_layout(spec.train, 2), "pretrain")
    spec = _spec(tmp_path, 2, "defaults.distributed.deepspeed_config.bf16.bf16_master_weights_and_grads=false")
    with pytest.raises(RecipeError, match="contradicts the recipe"):
        deepspeed_config(spec, batch_layout(spec.train, 2), "pretrain")
    # ZeRO-0 with DeepSpeed's bf16 on would swap fp32 master copies into the optimizer.
    spec = _spec(tmp_path, 0, "defaults.distributed.deepspeed_config.bf16.enabled=true")
    with pytest.raises(RecipeError, match=r"bf16.enabled=True contradicts the recipe, which gives False"):
        deepspeed_config(spec, batch_layout(spec.train, 2), "pretrain")


@pytest.mark.dist
@pytest.mark.parametrize("zero", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
                                  2, 3])
def test_zero_on_two_ranks_shards_the_collage_state(tmp_path: Path, single_run: Path, zero: int):
    path = write_recipe(tmp_path, _recipe(zero_stage=zero))
    _run(["run", str(path), "--quiet"], tmp_path)
    records, single = _records(tmp_path / "runs" / "t"), _records(single_run)
    # Same data, same start: bf16 gradients reduced over ranks instead of summed in one process.
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single], rel=2e-3)
    assert records[-1]["collage_edq_share"] == pytest.approx(1.0, abs=0.01)
    share = records[-1]["optim_state_mb"] / single[-1]["optim_state_mb"]
    assert share == (1.0 if zero == 0 else pytest.approx(0.5, rel=0.01))  # ZeRO 1-3: this rank's half
    ckpt = next((tmp_path / "runs" / "t" / "pretrain" / "checkpoints").iterdir())
    for f in ckpt.rglob("*optim_states.pt"):  # what each rank holds, as saved: all bf16
        held = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        tensors = [t for t in _tensors(held) if t.is_floating_point() and t.numel() > 1]
        assert tensors and {t.dtype for t in tensors} == {torch.bfloat16}, f


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.dist
def test_zero2_resume_is_exact(tmp_path: Path):
    """The bf16 partitions and Collage's lo/m/v/v_lo partitions come back bit for bit."""
    path = write_recipe(tmp_path, _recipe(zero_stage=2))
    _run(["run", str(path), "--quiet"], tmp_path)
    run_dir = tmp_path / "runs" / "t"
    first = load_file(str(run_dir / "pretrain" / "model" / "model.safetensors"))
    losses = [r["loss"] for r in _records(run_dir)]
    shutil.rmtree(run_dir / "pretrain" / "model")
    out = _run(["run", str(path)], tmp_path)
    assert "resuming from step-00000003" in out
    second = load_file(str(run_dir / "pretrain" / "model" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in _records(run_dir)] == losses
