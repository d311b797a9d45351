from pathlib import Path

import pytest

from instar.config.load import load_recipe
from instar.errors import RecipeError
from instar.graph.dag import StageGraph
from instar.graph.plan import make_plan
from tests.conftest import tiny_recipe, write_recipe


def _graph(tmp_path: Path, recipe: dict) -> StageGraph:
    return StageGraph(load_recipe(write_recipe(tmp_path, recipe)).recipe)


def test_fan_out_and_fan_in_topological_order(tmp_path: Path):
    graph = _graph(tmp_path, tiny_recipe())
    order = graph.topo_order()
    assert order == ["pretrain", "cpt", "sft", "sft_steps", "merged"]
    assert set(graph.children("cpt")) == {"sft", "sft_steps"}
    assert graph.descendants("cpt") == {"sft", "sft_steps", "merged"}


def test_cycle_is_printed(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["pretrain"]["after"] = ["sft"]
    recipe["stages"]["pretrain"]["kind"] = "cpt"
    with pytest.raises(RecipeError, match=r"cycle: (\w+ -> ){3}\w+") as err:
        _graph(tmp_path, recipe)
    cycle = str(err.value).split("cycle: ")[1].split("\n")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"pretrain", "cpt", "sft"}


def test_missing_parent_suggests(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["after"] = ["cptt"]
    with pytest.raises(RecipeError, match=r"parent 'cptt' is not a stage of this recipe; did you mean 'cpt'\?"):
        _graph(tmp_path, recipe)


def test_parent_counts_per_kind(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["cpt"]["after"] = []
    recipe["stages"]["merged"]["after"] = ["sft"]
    with pytest.raises(RecipeError) as err:
        _graph(tmp_path, recipe)
    assert "stages.cpt.after: a cpt stage takes 1 to 1 parent(s), got 0" in str(err.value) or \
        "stages.cpt.after: a cpt stage takes 1 parent(s), got 0" in str(err.value)
    assert "stages.merged.after: a merge stage takes at least 2 parent(s), got 1" in str(err.value)


def test_merge_without_shared_base_is_refused(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"]["other"] = {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 50}}}
    recipe["stages"]["merged"]["after"] = ["sft", "other"]
    with pytest.raises(RecipeError, match=r"parents sft, other share no base stage"):
        _graph(tmp_path, recipe)


def test_fingerprints_change_exactly_downstream(tmp_path: Path):
    path = write_recipe(tmp_path, tiny_recipe())
    before = {sp.name: sp.fingerprint for sp in make_plan(load_recipe(path))}
    after = {sp.name: sp.fingerprint for sp in make_plan(load_recipe(path, ["stages.sft.train.lr=1e-4"]))}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"sft", "merged"}
    cosmetic = {sp.name: sp.fingerprint for sp in make_plan(load_recipe(path, ["defaults.train.log_every=1"]))}
    assert cosmetic == before


def test_fingerprint_follows_data_content(tmp_path: Path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "1+1=2"}\n')
    recipe = tiny_recipe()
    recipe["stages"]["pretrain"]["data"] = {"path": "docs.jsonl"}
    path = write_recipe(tmp_path, recipe)
    first = make_plan(load_recipe(path))[0].fingerprint
    data.write_text('{"text": "1+2=3"}\n')
    assert make_plan(load_recipe(path))[0].fingerprint != first
