"""Kind checks see the stage as it will run (its settings over `defaults`), and the names a recipe
picks from a registry (DPO losses, GRPO loss types and advantage scalings, rewards) are checked when
it loads: exit code 2, the file:line and field, the closest name."""

from __future__ import annotations

from pathlib import Path

import pytest

from instar.cli import main
from tests.conftest import tiny_recipe, write_recipe

PARENT_KINDS = {  # a stage of each kind after a pretrain stage, with no section of its own but data
    "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 8}}},
    "cpt": {"kind": "cpt", "replay": 0.5, "data": {"generate": {"split": "cpt", "rows": 8}}},
    "sft": {"kind": "sft", "data": {"generate": {"split": "sft", "rows": 8}}},
    "dpo": {"kind": "dpo", "data": {"generate": {"split": "dpo", "rows": 8}}},
    "grpo": {"kind": "grpo", "data": {"generate": {"split": "prompts", "rows": 8}}},
}


def _recipe(stage: dict, **defaults) -> dict:
    recipe = tiny_recipe()
    recipe["model"]["config"]["max_position_embeddings"] = 512  # room for the seq_len 256 below
    recipe["stages"] = {"base": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 8}}},
                        "other": {"kind": "sft", "after": ["base"], "data": {"generate": {"split": "sft", "rows": 8}}},
                        "stage": {**stage, "after": ["base"] if stage["kind"] != "pretrain" else []}}
    if stage["kind"] == "merge":
        recipe["stages"]["stage"]["after"] = ["base", "other"]
    for section, values in defaults.items():
        recipe["defaults"].setdefault(section, {}).update(values)
    return recipe


def _validate(tmp_path: Path, recipe: dict, capsys) -> tuple[int, str]:
    code = main(["validate", str(write_recipe(tmp_path, recipe))])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


@pytest.mark.parametrize("kind", [*PARENT_KINDS, "merge"])
def test_every_kind_validates_with_its_settings_only_from_defaults(tmp_path: Path, capsys, kind: str):
    stage = PARENT_KINDS.get(kind, {"kind": "merge"})
    code, err = _validate(tmp_path, _recipe(stage, train={"seq_len": 256}), capsys)
    assert code == 0, err


def test_grpo_check_reads_seq_len_from_defaults(tmp_path: Path, capsys):
    grpo = {**PARENT_KINDS["grpo"], "max_new_tokens": 200, "train": {"steps": 2}}
    code, err = _validate(tmp_path, _recipe(grpo, train={"seq_len": 256}), capsys)
    assert code == 0, err  # was refused: "seq_len (128) must exceed max_new_tokens (200)"
    code, err = _validate(tmp_path, _recipe(grpo, train={"seq_len": 100}), capsys)
    assert code == 2 and "defaults.train.seq_len (100) must exceed stages.stage.max_new_tokens (200)" in err, err
    own = {**grpo, "train": {"steps": 2, "seq_len": 150}}
    code, err = _validate(tmp_path, _recipe(own, train={"seq_len": 256}), capsys)
    assert code == 2 and "stages.stage.train.seq_len (150) must exceed" in err, err


@pytest.mark.parametrize("kind,field,value,needle", [
    ("dpo", "loss", "sigmod", "stages.stage.loss: unknown DPO loss 'sigmod'; did you mean 'sigmoid'?"),
    ("grpo", "loss_type", "dappo", "stages.stage.loss_type: unknown GRPO loss type 'dappo'; did you mean 'dapo'?"),
    ("grpo", "scale_rewards", "groups", "stages.stage.scale_rewards: unknown advantage scaling (scale_rewards) "
                                        "'groups'; did you mean 'group'?"),
    ("grpo", "rewards", [{"fn": "exactly"}], "stages.stage.rewards[0].fn: unknown reward 'exactly'; did you mean "
                                             "'exact'?"),
])
def test_unknown_registry_names_are_refused_at_load(tmp_path: Path, capsys, kind, field, value, needle):
    code, err = _validate(tmp_path, _recipe({**PARENT_KINDS[kind], field: value}), capsys)
    assert code == 2 and needle in err, err
    if field != "rewards":  # checked by the schema, which knows lines (a reward is checked with the graph)
        assert "recipe.yaml:" in err
