"""Hostile recipes and faults (issue 15): each test reproduces one way instar lost or leaked data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.cli import main
from instar.config.load import check_model, load_recipe
from instar.data.jsonl import write_rows
from instar.data.tokenizer import load_tokenizer
from instar.errors import RecipeError, TrainingError
from instar.graph.dag import StageGraph
from instar.graph.runner import run_recipe
from instar.graph.state import read_state
from instar.models.build import model_from_config
from instar.models.export import check_finite, remove_tree, write_artifact
from instar.trainer.context import stage_folder
from tests.conftest import tiny_recipe, write_recipe


def _stage_named(tmp_path: Path, name) -> Path:
    recipe = tiny_recipe()
    recipe["stages"] = {name: recipe["stages"]["pretrain"]}
    return write_recipe(tmp_path, recipe)


@pytest.mark.parametrize("name", ["/abs/path/victim", "../../x", "", ".", "data", "a/b", "graph.json", "Slurm",
                                  "x" * 300, 7, None])
def test_stage_names_that_are_not_one_plain_folder_are_refused(tmp_path: Path, name):
    path = _stage_named(tmp_path, name)
    with pytest.raises(RecipeError, match=rf"{path}:\d+: stages\.") as err:
        load_recipe(path)
    assert "rename" in str(err.value) or "shorten" in str(err.value) or "quote" in str(err.value)


def test_plain_stage_names_load(tmp_path: Path):
    assert list(load_recipe(_stage_named(tmp_path, "pre-train_2.v1")).recipe.stages) == ["pre-train_2.v1"]


def test_non_finite_numbers_are_refused(tmp_path: Path):
    path = write_recipe(tmp_path, tiny_recipe())
    path.write_text(path.read_text().replace("lr: 0.003", "lr: .inf"))
    with pytest.raises(RecipeError, match=r"defaults\.train\.lr: Input should be a finite number"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"optimizer\.eps: Input should be a finite number"):
        load_recipe(write_recipe(tmp_path, tiny_recipe()), ["defaults.optimizer.eps=.nan"])
    with pytest.raises(RecipeError, match=r"model\.config\.rms_norm_eps: inf holds a non-finite number"):
        load_recipe(write_recipe(tmp_path, tiny_recipe()), ["model.config.rms_norm_eps=.inf"])


def test_duplicate_keys_name_both_lines(tmp_path: Path):
    text = write_recipe(tmp_path, tiny_recipe()).read_text()
    text = text.replace("    lr: 0.003\n", "    lr: 0.003\n    lr: 0.1\n")
    text = text.replace("stages:\n", "stages:\n  sft:\n    kind: sft\n")
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    lines = text.splitlines()
    lr = [i + 1 for i, line in enumerate(lines) if line.strip().startswith("lr:")]
    sft = [i + 1 for i, line in enumerate(lines) if line == "  sft:"]
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:{lr[1]}: defaults.train.lr: given twice (also at line {lr[0]})" in msg
    assert f"{path}:{sft[1]}: stages.sft: given twice (also at line {sft[0]})" in msg


def test_model_config_typo_names_key_and_closest(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["model"]["config"]["hidden_sise"] = recipe["model"]["config"].pop("hidden_size")
    recipe["model"]["config"]["rope_theta"] = 10000.0  # a legacy key HF still maps: accepted
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: model.config.hidden_sise: not a field of LlamaConfig, "
                                          r"which ignores it; did you mean 'hidden_size'\?") as err:
        check_model(load_recipe(path))
    assert "rope_theta" not in str(err.value)


@pytest.mark.parametrize("seq_len", [129, 1_000_000_000])
def test_seq_len_is_bounded_by_the_models_positions(tmp_path: Path, seq_len):
    recipe = tiny_recipe()
    recipe["stages"]["sft"]["train"]["seq_len"] = seq_len
    with pytest.raises(RecipeError, match=r"stages\.sft\.train\.seq_len"):
        check_model(load_recipe(write_recipe(tmp_path, recipe)))
    assert main(["run", "--quiet", str(write_recipe(tmp_path, recipe))]) == 2  # before any stage trains
    assert not (tmp_path / "runs" / "t" / "pretrain").exists()  # (the plan wrote the generated data only)


def test_seq_len_is_bounded_by_a_model_folders_positions(tmp_path: Path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 32}))
    recipe = tiny_recipe()
    recipe["model"] = {"path": "base", "tokenizer": "instar-char"}
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.train\.seq_len: 64 is more than the model's "
                                          r"max_position_embeddings \(32\); lower seq_len or use a longer model"):
        check_model(load_recipe(write_recipe(tmp_path, recipe)))


def test_a_cached_run_imports_no_torch(tmp_path: Path):
    """The model check imports HF's config classes (and torch): only when a stage will run."""
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": {**recipe["stages"]["pretrain"], "train": {"steps": 1}}}
    recipe["defaults"]["eval"] = {}
    path = write_recipe(tmp_path, recipe)
    assert main(["run", "--quiet", str(path)]) == 0
    probe = ("import sys; from instar.cli import main; code = main(['run', '--quiet', sys.argv[1]]); "
             "sys.exit(code or 3 * ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported"


def test_alias_bomb_is_refused_quickly(tmp_path: Path):
    path = write_recipe(tmp_path, tiny_recipe())
    bomb = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = path.read_text().replace("defaults:\n", "defaults:\n  bomb:\n" + "".join(f"    {b}\n" for b in bomb), 1)
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"expand this recipe to more than 100,000 values"):
        load_recipe(path)
    path.write_text("run: &r {name: t, x: *r}\n")
    with pytest.raises(RecipeError, match="recursive structure"):
        load_recipe(path)


def test_small_anchors_still_work(tmp_path: Path):
    text = write_recipe(tmp_path, tiny_recipe()).read_text()
    text = text.replace("    train:\n      steps: 12\n", "    train: &t\n      steps: 12\n")
    text = text.replace("    train:\n      steps: 6\n", "    train: *t\n", 1)  # cpt's
    (tmp_path / "a.yaml").write_text(text)
    assert load_recipe(tmp_path / "a.yaml").recipe.stages["cpt"].train.steps == 12


@pytest.mark.parametrize("name", ["../victim", "/abs/victim", "a/b", "data", ""])
def test_stage_folder_refuses_paths_outside_the_run(tmp_path: Path, name):
    """The one place stage paths are built refuses names that bypass the recipe (argv, graph.json)."""
    run_dir = tmp_path / "runs" / "t"
    with pytest.raises(RecipeError, match=f"stage {name!r}"):
        stage_folder(run_dir, name)
    assert stage_folder(run_dir, "sft") == run_dir / "sft"


def test_symlinked_stage_folder_is_refused(tmp_path: Path):
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    (run_dir / "sft").symlink_to(tmp_path / "victim")
    with pytest.raises(RecipeError, match="resolves outside the run directory"):
        stage_folder(run_dir, "sft")


def test_worker_with_a_hostile_stage_argument_writes_nothing_outside(tmp_path: Path):
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "instar.graph.worker", str(run_dir), "../escaped"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert out.returncode == 2 and "stage '../escaped'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "escaped").exists()


def _one_stage(tmp_path: Path, **train) -> Path:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 4, **train}
    recipe["defaults"]["eval"] = {}
    return write_recipe(tmp_path, recipe)


def test_a_diverged_stage_fails_and_exports_nothing(tmp_path: Path):
    """lr 1e30: step 1 applies and makes every weight non-finite, later steps are skipped (fewer than
    max_bad_steps): the stage used to be `done` with NaN weights."""
    loaded = load_recipe(_one_stage(tmp_path, lr=1e30, max_bad_steps=5, checkpoint_every=0))
    with pytest.raises(TrainingError, match=r"its last 3 optimizer step\(s\) had a non-finite loss .* lower "
                                            r"stages\.pretrain\.train\.lr"):
        run_recipe(loaded, quiet=True)
    stage_dir = loaded.run_dir / "pretrain"
    assert not (stage_dir / "model").exists() and read_state(stage_dir)["state"] == "failed"


def test_write_artifact_refuses_non_finite_weights(tmp_path: Path):
    tokenizer = load_tokenizer("instar-char")
    model = model_from_config(tiny_recipe()["model"]["config"], tokenizer, seed=0)
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    with pytest.raises(TrainingError, match=r"stage 's': weight model\.norm\.weight holds inf or NaN"):
        write_artifact(tmp_path / "s" / "model", model, tokenizer, {"stage": "s"})
    assert not (tmp_path / "s").exists()


def test_non_finite_check_covers_fp8_weights():
    layer = torch.nn.Linear(4, 4).to(torch.float8_e4m3fn)
    check_finite(layer, "stage 's'")  # no isfinite kernel for FP8: upcast, not a crash
    with torch.no_grad():
        layer.weight.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    with pytest.raises(TrainingError, match="weight weight holds inf or NaN"):
        check_finite(layer, "stage 's'")


def _weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished 12-step stage with its checkpoints at steps 4 and 8, and its final weights/losses."""
    folder = tmp_path_factory.mktemp("ckpt")
    loaded = load_recipe(_one_stage(folder, steps=12, checkpoint_every=4))
    run_recipe(loaded, quiet=True)
    stage_dir = loaded.run_dir / "pretrain"
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    return loaded, stage_dir, _weights(stage_dir / "model"), _losses(stage_dir)


def _largest_file(ckpt: Path) -> Path:
    return max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", [_truncate, Path.unlink, _flip], ids=["truncated", "deleted", "flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(checkpointed_run, damage, capfd):
    loaded, stage_dir, weights, losses = checkpointed_run
    remove_tree(stage_dir / "model")  # the stage is pending again, with its two checkpoints
    victim = _largest_file(stage_dir / "checkpoints" / "step-00000008")
    damage(victim)
    run_recipe(loaded, quiet=False)
    err = capfd.readouterr()
    assert f"checkpoint {stage_dir / 'checkpoints' / 'step-00000008'} is damaged ({victim.name}" in err.err
    assert "resuming from step-00000004 (step 4/12)" in err.out
    got = _weights(stage_dir / "model")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    assert _losses(stage_dir) == losses


def test_every_checkpoint_damaged_is_a_clear_error(checkpointed_run, capsys):
    loaded, stage_dir, _, _ = checkpointed_run
    remove_tree(stage_dir / "model")
    for ckpt in (stage_dir / "checkpoints").iterdir():
        _flip(_largest_file(ckpt))
    assert main(["run", str(loaded.path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint of this stage" in err and f"delete {stage_dir / 'checkpoints'}" in err
    assert "Traceback" not in err


def test_leftovers_of_a_killed_run_are_removed_on_the_next_run(checkpointed_run, capsys):
    """A kill during export leaves `.model.tmp*` (a whole model), one while an old checkpoint is being
    removed `.step-N.trash*`, one mid-save `.tmp-step-N`: the stage's next run removes them and says so."""
    loaded, stage_dir, _, _ = checkpointed_run
    remove_tree(stage_dir / "model")
    shutil.rmtree(stage_dir / "checkpoints")  # a fresh start: the leftovers must not count as checkpoints
    (stage_dir / "checkpoints").mkdir()
    (stage_dir / ".model.tmpab12cd").mkdir()
    (stage_dir / ".model.tmpab12cd" / "model.safetensors").write_bytes(b"x" * 2**20)
    (stage_dir / "checkpoints" / ".step-00000004.trash4242").mkdir()
    (stage_dir / "checkpoints" / ".step-00000004.trash4242" / "loop.json").write_text("{}")
    (stage_dir / "checkpoints" / ".tmp-step-00000008").mkdir()
    (stage_dir / ".state.json.tmp999").write_text("{}")
    run_recipe(loaded, quiet=False)
    out = capsys.readouterr().out
    assert "[pretrain] removed 4 leftover(s) of a killed run (1.0 MiB)" in out
    assert sorted(p.name for p in stage_dir.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_and_data_follow_the_umask(tmp_path: Path, umask):
    """tempfile and safetensors wrote 0700 / 0600: the team could not read the models."""
    old = os.umask(umask)
    try:
        loaded = load_recipe(_one_stage(tmp_path, steps=2, checkpoint_every=1))
        run_recipe(loaded, quiet=True)
        write_rows(tmp_path / "pairs.jsonl", [{"a": 1}])  # dpo's pairs, `instar data arithmetic`
    finally:
        os.umask(old)
    folder, file = 0o777 & ~umask, 0o666 & ~umask
    assert (tmp_path / "pairs.jsonl").stat().st_mode & 0o777 == file
    model = loaded.run_dir / "pretrain" / "model"
    assert model.stat().st_mode & 0o777 == folder
    assert {p.stat().st_mode & 0o777 for p in model.iterdir()} == {file}
    ckpt = next((loaded.run_dir / "pretrain" / "checkpoints").iterdir())
    assert {p.stat().st_mode & 0o777 for p in [ckpt, *ckpt.rglob("*")] if p.is_dir()} == {folder}
    assert {p.stat().st_mode & 0o777 for p in ckpt.rglob("*") if p.is_file()} == {file}


def _chain(tmp_path: Path, n: int, cycle: bool = False) -> Path:
    recipe = tiny_recipe()
    data = {"generate": {"split": "cpt", "rows": 10}}
    stages = {"s0": recipe["stages"]["pretrain"]}
    stages.update({f"s{i}": {"kind": "cpt", "after": [f"s{i - 1}"], "data": data} for i in range(1, n)})
    if cycle:
        stages["s0"] = {"kind": "cpt", "after": [f"s{n - 1}"], "data": data}
    recipe["stages"] = stages
    return write_recipe(tmp_path, recipe)


def test_a_3000_stage_chain_is_validated_and_ordered(tmp_path: Path):
    graph = StageGraph(load_recipe(_chain(tmp_path, 3000)).recipe)
    assert graph.topo_order() == [f"s{i}" for i in range(3000)]
    assert graph.descendants("s2990") == {f"s{i}" for i in range(2991, 3000)}
    with pytest.raises(RecipeError, match=r"the stages form a cycle: s0 -> s1 -> .* -> s2999 -> s0"):
        StageGraph(load_recipe(_chain(tmp_path, 3000, cycle=True)).recipe)


def test_topo_order_keeps_recipe_order_among_ready_stages(tmp_path: Path):
    recipe = tiny_recipe()
    stages = recipe["stages"]
    recipe["stages"] = {"merged": stages["merged"], "sft_steps": stages["sft_steps"], "pretrain": stages["pretrain"],
                        "sft": stages["sft"], "cpt": stages["cpt"]}
    graph = StageGraph(load_recipe(write_recipe(tmp_path, recipe)).recipe)
    assert graph.topo_order() == ["pretrain", "cpt", "sft_steps", "sft", "merged"]
    assert graph.descendants("cpt") == {"sft", "sft_steps", "merged"}
