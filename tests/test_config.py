from pathlib import Path

import pytest
import yaml

from instar.config.load import load_recipe
from instar.config.overrides import parse_override
from instar.config.resolve import resolve_stage
from instar.errors import RecipeError
from tests.conftest import tiny_recipe, write_recipe


def test_loads_and_resolves_defaults(recipe_path: Path):
    loaded = load_recipe(recipe_path)
    sft = resolve_stage(loaded.recipe, "sft")
    assert sft.train.steps == 6                      # the stage's own value
    assert sft.train.micro_batch_size == 4           # inherited from defaults.train
    assert sft.train.warmup_ratio == 0.05            # the schema's default
    assert sft.eval.exact_match.formats == ["plain", "chat"]
    assert type(sft).__name__ == "SftSpec" and sft.loss_on == "assistant"


def test_dotlist_override_changes_one_field(recipe_path: Path):
    loaded = load_recipe(recipe_path, ["stages.sft.train.lr=1e-5", "defaults.train.seq_len=96"])
    sft = resolve_stage(loaded.recipe, "sft")
    assert sft.train.lr == pytest.approx(1e-5) and sft.train.seq_len == 96 and sft.train.steps == 6
    assert resolve_stage(loaded.recipe, "pretrain").train.lr == pytest.approx(3e-3)


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(RecipeError, match="dotted.key=value"):
        parse_override("novalue")


def test_unknown_key_names_path_line_and_closest(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["train"]["lrr"] = 0.1
    path = write_recipe(tmp_path, recipe)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "lrr" in text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:{line}: stages.sft.train.lrr: unknown key; did you mean 'lr'?" in msg


def test_unknown_key_from_override_is_named(recipe_path: Path):
    with pytest.raises(RecipeError, match=r"command-line override stages.sft.train.stepz.*did you mean 'steps'"):
        load_recipe(recipe_path, ["stages.sft.train.stepz=3"])


def test_kind_specific_keys_are_checked(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["replay"] = 0.5          # a cpt setting on an sft stage
    with pytest.raises(RecipeError, match=r"stages.sft.replay: unknown key"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\nstages:\n  a: {kind: pretrain\n  b: 1\n")
    with pytest.raises(RecipeError, match=rf"{path}:\d+:\d+: malformed YAML"):
        load_recipe(path)


def test_unknown_kind_suggests(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["kind"] = "stf"
    with pytest.raises(RecipeError, match=r"stages.sft.kind: unknown kind 'stf'; did you mean 'sft'\?"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_wrong_type_and_range(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["train"]["steps"] = -1
    recipe["defaults"]["train"]["lr"] = "fast"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, recipe))
    assert "stages.sft.train.steps: Input should be greater than 0" in str(err.value)
    assert "defaults.train.lr: Input should be a valid number" in str(err.value)


def test_data_needs_exactly_one_source(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["data"] = {"path": "x.jsonl", "generate": {"split": "sft"}}
    with pytest.raises(RecipeError, match="stages.sft.data: give exactly one of"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_every_recipe_in_the_repo_validates():
    for path in sorted(Path(__file__).parent.parent.glob("recipes/**/*.yaml")):
        loaded = load_recipe(path)
        assert loaded.recipe.stages, path
        yaml.safe_dump(loaded.recipe.model_dump(mode="json"))  # serialisable, subclasses included


def test_zero3_recipe_is_the_tiny_pipeline_on_two_ranks():
    root = Path(__file__).parent.parent / "recipes" / "tiny"
    base = load_recipe(root / "pipeline.yaml").recipe
    zero3 = load_recipe(root / "pipeline-zero3.yaml").recipe
    assert zero3.defaults.distributed.zero_stage == 3 and zero3.defaults.distributed.world_size == 2
    for name in base.stages:
        a, b = resolve_stage(base, name), resolve_stage(zero3, name)
        assert a.train.micro_batch_size * a.train.grad_accum == b.train.micro_batch_size * b.train.grad_accum * 2
        assert a.model_dump(exclude={"distributed", "train"}) == b.model_dump(exclude={"distributed", "train"})
        assert a.train.model_dump(exclude={"micro_batch_size"}) == b.train.model_dump(exclude={"micro_batch_size"})


def test_every_precision_has_one_policy():
    """`precision:` names are the schema's; what each means lives in one policy object."""
    from typing import get_args

    import torch

    from instar.config.precision import POLICIES
    from instar.config.schema import Precision

    assert set(get_args(Precision)) == set(POLICIES)
    assert [p for p, pol in POLICIES.items() if pol.autocast] == ["bf16", "fp8"]
    assert {p: pol.collage for p, pol in POLICIES.items() if pol.bf16_params} == {
        "bf16-pure": None, "collage-light": "light", "collage-plus": "plus"}
    assert {p for p, pol in POLICIES.items() if pol.compute_dtype == torch.float32} == {"fp32"}
