"""Hostile input that used to end in a traceback: one line naming the file / field and the fix, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, write_recipe
from tests.test_cli_errors import _fails


@pytest.mark.parametrize("weights", [[0, 0], [1.5, -1.5]])
def test_merge_weights_summing_to_zero_fail_validation(tmp_path: Path, capsys, weights):
    recipe = tiny_recipe()
    recipe["stages"]["merged"]["weights"] = weights
    _fails(["validate", str(write_recipe(tmp_path, recipe))], capsys, "stages.merged.weights", "sum to 0",
           "positive sum")


@pytest.mark.parametrize("override,needle", [
    ("defaults.optimizer.betas=[0.9,1.0]", "defaults.optimizer.betas.1: Input should be less than 1"),
    ("defaults.optimizer.betas=[-0.1,0.9]", "defaults.optimizer.betas.0: Input should be greater than or equal to 0"),
    ("run.seed=18446744073709551616", "run.seed: Input should be less than 18446744073709551616"),
])
def test_optimizer_betas_and_seed_bounds(tmp_path: Path, capsys, override, needle):
    _fails(["validate", str(write_recipe(tmp_path, tiny_recipe())), override], capsys,
           f"command-line override {override.partition('=')[0]}", needle)


def test_largest_seed_is_accepted(tmp_path: Path, capsys):
    from instar.cli import main

    assert main(["validate", str(write_recipe(tmp_path, tiny_recipe())), f"run.seed={(1 << 64) - 1}"]) == 0


@pytest.mark.parametrize("overrides,needle", [
    (["stages.newstage.kind=sftt"], "command-line override stages.newstage.kind: stages.newstage.kind: unknown kind"),
    (["stages.newstage.after=[sft]"], "command-line override stages.newstage.after: stages.newstage: missing `kind`"),
])
def test_a_stage_created_by_an_override_blames_the_override(tmp_path: Path, capsys, overrides, needle):
    path = write_recipe(tmp_path, tiny_recipe())
    err = _fails(["validate", str(path), *overrides], capsys, needle)
    assert f"{path}:?" not in err


GOOD_CHAT = b'{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}\n'


def _one_sft_stage(tmp_path: Path, data: dict) -> Path:
    recipe = tiny_recipe()
    recipe["defaults"]["eval"] = {}
    recipe["stages"] = {"sft": {"kind": "sft", "data": data, "train": {"steps": 1}}}
    return write_recipe(tmp_path, recipe)


def test_non_utf8_row_names_its_line(tmp_path: Path, capsys):
    (tmp_path / "chat.jsonl").write_bytes(GOOD_CHAT + b'{"messages": "\xff\xfe caf\xe9"}\n' + GOOD_CHAT)
    path = _one_sft_stage(tmp_path, {"path": "chat.jsonl"})
    _fails(["run", str(path)], capsys, f"{tmp_path / 'chat.jsonl'}:2: bad row: not UTF-8 text (byte 0xff",
           "on_bad_row: skip")


def test_non_utf8_rows_are_skipped_and_counted(tmp_path: Path):
    from instar.data.formats import ROW_FORMATS
    from instar.data.jsonl import read_rows

    data = tmp_path / "chat.jsonl"
    data.write_bytes(GOOD_CHAT + b"\x00\x9c\xffPK\x03\x04\n" + GOOD_CHAT + b"\x89PNG\r\n")
    rows = read_rows(data, ROW_FORMATS["messages"], on_bad_row="skip")
    assert (len(rows.rows), rows.skipped) == (2, 2)
    assert rows.first_skip.startswith(f"{data}:2: not UTF-8 text")


def test_binary_file_with_skip_has_no_usable_rows(tmp_path: Path, capsys):
    (tmp_path / "chat.jsonl").write_bytes(b"\x80\xff\x00" * 1000)  # no newline: one line
    path = _one_sft_stage(tmp_path, {"path": "chat.jsonl", "on_bad_row": "skip"})
    _fails(["run", str(path)], capsys, "chat.jsonl: no usable rows (skipped 1; first problem:", "not UTF-8 text")


@pytest.mark.parametrize("content,needle", [
    (b'{"stages": [{"na', "graph.json: not valid JSON"),
    (b'\xff\xfe{"stages": []}', "graph.json: not valid JSON"),
    (b'[1, 2]', "graph.json: has no list of stages"),
    (b'{"stages": [{"kind": "sft"}]}', "graph.json: has no list of stages"),
])
def test_status_of_a_corrupted_graph_json(tmp_path: Path, capsys, content, needle):
    (tmp_path / "graph.json").write_bytes(content)
    _fails(["status", str(tmp_path)], capsys, str(tmp_path / needle.partition(":")[0]), needle, "`instar run` writes it")


def test_status_shows_stages_whose_entries_lost_fields(tmp_path: Path, capsys):
    from instar.cli import main

    (tmp_path / "graph.json").write_text('{"stages": [{"name": "sft", "parents": 3}]}')
    assert main(["status", str(tmp_path)]) == 0
    assert "pending" in capsys.readouterr().out


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    """A real tiny Llama written by save_pretrained (model.safetensors + config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from instar.data.tokenizer import build_char_tokenizer

    cfg = dict(tiny_recipe()["model"]["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(build_char_tokenizer()), **cfg)
    folder = tmp_path_factory.mktemp("hf") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _truncate(d: Path) -> None:
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:2000])


def _unknown_type(d: Path) -> None:
    import json

    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))


def _pickle_only(d: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


@pytest.mark.parametrize("damage,needles", [
    (_truncate, ["corrupt or truncated weights in model.safetensors", "copy or export the model again"]),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), ["corrupt or truncated weights"]),
    (_unknown_type, ["config.json: transformers", "nosuchmodel", "fix config.json"]),
    (_pickle_only, ["only pickle weights (pytorch_model.bin)", "safetensors only", "save_pretrained(new_dir)"]),
    (lambda d: (d / "model.safetensors").unlink(), ["no weights here"]),
])
def test_damaged_model_path(tmp_path: Path, capsys, hf_model_dir, damage, needles):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(hf_model_dir, model)
    damage(model)
    recipe = tiny_recipe()
    recipe["model"] = {"path": "model", "tokenizer": "instar-char"}
    recipe["defaults"]["eval"] = {}
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 20}},
                                     "train": {"steps": 1}}}
    err = _fails(["run", str(write_recipe(tmp_path, recipe)), "--quiet"], capsys, f"model.path: {model}", *needles)
    assert "weights_only=False" not in err


def test_intact_model_path_loads(hf_model_dir):
    from instar.models.build import load_pretrained

    assert load_pretrained(hf_model_dir).config.model_type == "llama"


def _tmpfs(folder: Path, options: str):
    """Mount a tmpfs at `folder` for the test (root only; skipped without mount), unmounted after."""
    import subprocess

    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed writer may hold a file open


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder nobody may write: a read-only tmpfs as root (root ignores permission bits), else mode 0500."""
    import os

    if os.geteuid() == 0:
        yield from _tmpfs(tmp_path / "ro", "ro,size=64k")
        return
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    yield folder
    folder.chmod(0o700)


@pytest.fixture(params=["16k", "64k"])
def small_disk(tmp_path: Path, request):
    """A disk smaller than the tiny model's checkpoint (~0.2 MiB): at 16 KiB safetensors' write of the
    weights fails ("os error 28"), at 64 KiB torch.save's of Adam's moments (a RuntimeError)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield from _tmpfs(tmp_path / "small", f"size={request.param}")


def _output_dir_recipe(tmp_path: Path, output_dir: Path) -> Path:
    recipe = tiny_recipe()
    recipe["run"]["output_dir"] = str(output_dir)
    return write_recipe(tmp_path, recipe)


def _unwritable(case: str, tmp: Path, read_only: Path) -> Path:
    """An output_dir whose run folder `t` cannot be written."""
    if case in ("file", "run folder is a file"):
        folder = tmp / "runs"
        (folder if case == "file" else folder / "t").parent.mkdir(exist_ok=True)
        (folder if case == "file" else folder / "t").write_text("a file")
        return folder
    if case == "run folder read-only":  # with run.name=ro: the run folder exists
        return read_only.parent
    return read_only if case == "read-only" else read_only / "deeper"


@pytest.mark.parametrize("case", ["file", "run folder is a file", "read-only", "below a read-only folder",
                                  "run folder read-only"])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_unwritable_output_dir(tmp_path: Path, capsys, read_only_dir, case, command):
    output_dir = _unwritable(case, tmp_path, read_only_dir)
    name = "ro" if case == "run folder read-only" else "t"
    _fails([command, str(_output_dir_recipe(tmp_path, output_dir)), f"run.name={name}"], capsys,
           f"run.output_dir: cannot write the run directory {output_dir / name}", "point run.output_dir at")


def _enospc(path: Path) -> OSError:
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path: Path, capsys, monkeypatch):
    from instar.cli import main
    from instar.trainer import checkpoint

    real, saves = checkpoint._write_manifest, []

    def second_save_fills_the_disk(tmp: Path, engine) -> None:
        saves.append(tmp.name)
        if len(saves) == 2:
            raise _enospc(tmp / "manifest.json")
        real(tmp, engine)

    monkeypatch.setattr(checkpoint, "_write_manifest", second_save_fills_the_disk)
    recipe = tiny_recipe()
    recipe["defaults"]["eval"] = {}
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}  # 12 steps, a checkpoint every 5
    path = write_recipe(tmp_path, recipe)
    root = tmp_path / "runs" / "t" / "pretrain" / "checkpoints"
    _fails(["run", str(path), "--quiet"], capsys, f"checkpoint step-00000010: the disk holding {root} is full",
           "a checkpoint needs about", "as step-00000005", "run `instar run` again to resume")
    assert checkpoint.verify(root / "step-00000005") is None
    monkeypatch.setattr(checkpoint, "_write_manifest", real)
    assert main(["run", str(path), "--quiet"]) == 0  # space freed: it resumes and finishes


def test_disk_full_on_a_real_small_disk_while_checkpointing(tmp_path: Path, small_disk):
    from instar.errors import TrainingError
    from instar.trainer.checkpoint import save_checkpoint
    from instar.trainer.single_engine import SingleEngine
    from tests.test_engine_semantics import _model, _spec

    engine = SingleEngine(_model(), _spec(write_recipe(tmp_path, tiny_recipe())), stage="pretrain")
    with pytest.raises(TrainingError, match=r"checkpoint step-00000001: the disk holding .* is full \(0.0 MiB free; "
                                            r"a checkpoint needs more than the 0.\d MiB written when it filled"):
        save_checkpoint(small_disk / "checkpoints", 1, engine, {}, keep=2)


def _export(model_dir: Path):
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.export import write_artifact
    from tests.test_engine_semantics import _model

    tokenizer = build_char_tokenizer()
    return tokenizer, lambda: write_artifact(model_dir, _model(), tokenizer, {"stage": "sft"})


def test_disk_full_while_exporting(tmp_path: Path, monkeypatch):
    from instar.errors import TrainingError

    tokenizer, export = _export(tmp_path / "sft" / "model")
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda folder: (_ for _ in ()).throw(_enospc(folder)))
    with pytest.raises(TrainingError, match=r"stage 'sft': exporting its model to .*/sft/model filled the disk "
                                            r"\(the weights need about 0.\d MiB, .* free\); the partial export was removed"):
        export()
    assert list((tmp_path / "sft").iterdir()) == []


def test_disk_full_on_a_real_small_disk_while_exporting(small_disk):
    from instar.errors import TrainingError

    with pytest.raises(TrainingError, match=r"exporting its model to .* filled the disk"):
        _export(small_disk / "sft" / "model")[1]()
    assert list((small_disk / "sft").iterdir()) == []
