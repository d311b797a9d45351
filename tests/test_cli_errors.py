"""Bad input: one clear message, exit code 2, and nothing already completed touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from instar.cli import main
from instar.data.tokenizer import build_char_tokenizer
from tests.conftest import tiny_recipe, write_recipe


def _fails(args: list[str], capsys, *needles: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _small() -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "sft": recipe["stages"]["sft"]}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["stages"]["pretrain"]["train"] = {"steps": 2}
    recipe["stages"]["sft"]["train"] = {"steps": 2}
    recipe["defaults"]["eval"] = {}
    return recipe


def test_validate_and_plan_accept_a_good_recipe(tmp_path: Path, capsys):
    path = write_recipe(tmp_path, tiny_recipe())
    assert main(["validate", str(path)]) == 0
    assert "valid (5 stages" in capsys.readouterr().out
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 5 and "sft, sft_steps" in out


@pytest.mark.parametrize("mutate,needles", [
    (lambda r: r["stages"]["sft"].update(after=["nope"]), ["parent 'nope' is not a stage"]),
    (lambda r: r["stages"]["sft"].update(kind="dpoo"), ["unknown kind 'dpoo'"]),
    (lambda r: r["stages"]["sft"]["train"].update(lrr=1), ["stages.sft.train.lrr: unknown key; did you mean 'lr'?"]),
    (lambda r: r["stages"]["pretrain"].update(after=["sft"], kind="cpt"), ["cycle: "]),
    (lambda r: r["stages"]["sft"].update(data={"path": "missing.jsonl"}), ["missing.jsonl", "not found"]),
    (lambda r: r.update(extra={}), ["extra: unknown section"]),
])
def test_bad_recipes(tmp_path: Path, capsys, mutate, needles):
    recipe = _small()
    mutate(recipe)
    _fails(["run", str(write_recipe(tmp_path, recipe))], capsys, *needles)


def test_malformed_yaml(tmp_path: Path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("run: {name: x\n")
    _fails(["validate", str(path)], capsys, f"{path}:", "malformed YAML")


def test_merge_without_shared_base(tmp_path: Path, capsys):
    recipe = tiny_recipe()
    recipe["stages"]["solo"] = {"kind": "sft", "data": {"generate": {"split": "sft", "rows": 20}}}
    recipe["stages"]["merged"]["after"] = ["sft", "solo"]
    _fails(["validate", str(write_recipe(tmp_path, recipe))], capsys, "share no base stage")


def test_bad_row_fails_before_training_and_completed_stages_stay(tmp_path: Path, capsys):
    recipe = _small()
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "t"
    done = {s: (run_dir / s / "model" / "DONE").stat().st_mtime_ns for s in ("pretrain", "sft")}

    rows = tmp_path / "chat.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n'
                    '{"messages": "oops"}\n')
    recipe["stages"]["sft2"] = {"kind": "sft", "after": ["pretrain"], "data": {"path": "chat.jsonl"},
                                "train": {"steps": 2}}
    path = write_recipe(tmp_path, recipe)
    _fails(["run", str(path)], capsys, f"{rows}:2: bad row", "on_bad_row: skip")
    assert not (run_dir / "sft2").exists()
    assert {s: (run_dir / s / "model" / "DONE").stat().st_mtime_ns for s in done} == done

    recipe["stages"]["sft2"]["data"]["on_bad_row"] = "skip"
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path)]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out
    assert {s: (run_dir / s / "model" / "DONE").stat().st_mtime_ns for s in done} == done


def test_stage_tokenizer_differing_from_parent(tmp_path: Path, capsys):
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "othertok")
    recipe = _small()
    recipe["stages"]["sft"]["tokenizer"] = "othertok"
    _fails(["run", str(write_recipe(tmp_path, recipe))], capsys, "differs from stage 'pretrain'",
           "Drop stages.sft.tokenizer")


def test_status_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    _fails(["status", str(tmp_path)], capsys, "not an instar run directory")
