"""Data mistakes that used to train silently: a source smaller than one global batch and
characters the tokenizer maps to <unk> are warned about (with counts, once per stage); an
assistant turn with empty content is an error naming file:line. Through a real `instar run`."""

from __future__ import annotations

import json
from pathlib import Path

from instar.cli import main
from tests.conftest import tiny_recipe, write_recipe


def _run(tmp_path: Path, kind: str, rows: list[dict], capsys) -> tuple[int, str]:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe()
    recipe["stages"] = {"only": {"kind": kind, "data": {"path": str(data)}, "train": {"steps": 1}}}
    recipe["defaults"]["eval"] = {}
    code = main(["run", str(write_recipe(tmp_path, recipe)), "defaults.distributed.engine=single",
                 "defaults.distributed.nproc_per_node=1"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_source_smaller_than_one_global_batch_is_warned_with_the_counts(tmp_path: Path, capsys):
    code, out = _run(tmp_path, "pretrain", [{"text": "1+2=3"}, {"text": "4+5=9"}, {"text": "7+1=8"}], capsys)
    assert code == 0, out
    assert (f"[only] warning: {tmp_path / 'rows.jsonl'}: 3 row(s), fewer than one global batch of 4 rows "
            f"(micro_batch_size 4 x grad_accum 1 x 1 rank(s))") in " ".join(out.split()), out
    assert out.count("fewer than one global batch") == 1
    assert "<unk>" not in out  # ASCII only: nothing to say about characters


def test_characters_the_tokenizer_maps_to_unk_are_warned_with_counts(tmp_path: Path, capsys):
    rows = [{"text": "café au lait"}, {"text": "1+2=3"}, {"text": "5 € or 5 é"}, {"text": "plain"}]
    code, out = _run(tmp_path, "pretrain", rows, capsys)
    assert code == 0, out
    flat = " ".join(out.split())  # the console wraps long lines
    assert (f"[only] warning: {tmp_path / 'rows.jsonl'}: 2 of 4 row(s) hold 3 character(s) the tokenizer maps "
            f"to <unk> (2 distinct: 'é', '€')") in flat, out
    assert "fewer than one global batch" not in out  # 4 rows fill the global batch of 4


def test_an_assistant_turn_with_empty_content_is_an_error_naming_file_and_line(tmp_path: Path, capsys):
    good = {"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]}
    empty = {"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": ""}]}
    code, out = _run(tmp_path, "sft", [good, good, empty, good], capsys)
    assert code == 2, out
    assert (f"error: {tmp_path / 'rows.jsonl'}:3: bad row: messages.1: an assistant turn with empty content"
            in " ".join(out.split())), out
    assert "Traceback" not in out
