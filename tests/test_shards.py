"""Memmap token shards: `instar data tokenize`, the loader, and pretrain stages reading them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instar.cli import main
from instar.config.load import load_recipe
from instar.data.arithmetic import generate_rows
from instar.data.jsonl import write_rows
from instar.data.packing import Batcher
from instar.data.sampler import EpochSampler, MixtureSampler
from instar.data.shards import TokenShards, write_shards
from instar.data.tokenizer import build_char_tokenizer
from instar.errors import DataError, RecipeError
from instar.graph.dag import StageGraph
from instar.graph.plan import make_plan
from instar.graph.runner import run_recipe
from instar.trainer.kinds.pretrain import text_examples
from tests.conftest import same_batch, tiny_recipe, write_recipe


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    rows = generate_rows("pretrain", rows=600, seed=3)
    rows += [{"text": "a longer document " * 9}, {"text": "x"}]  # one over a 64-token row, one tiny
    path = tmp_path / "docs.jsonl"
    write_rows(path, rows)
    return path


def _tokenize(corpus: Path, out: Path, shard_tokens: int = 2000) -> dict:
    return write_shards(corpus, out, build_char_tokenizer(), "instar-char", shard_tokens=shard_tokens)


def _batcher(source, seq_len: int = 64) -> Batcher:
    return Batcher([source], MixtureSampler([EpochSampler(len(source), seed=5)], [1.0], seed=7), seq_len, True, 0)


def test_round_trip_gives_the_jsonl_paths_documents(corpus: Path, tmp_path: Path):
    index = _tokenize(corpus, tmp_path / "shards")
    assert len(index["shards"]) > 3 and index["dtype"] == "uint16" and index["documents"] == 602
    tok = build_char_tokenizer()
    expected = text_examples(tok, [json.loads(x) for x in corpus.read_text().splitlines()])
    shards = TokenShards(tmp_path / "shards")
    assert len(shards) == len(expected)
    for i, ex in enumerate(expected):
        got = shards[i]
        assert got.input_ids.tolist() == ex.input_ids and got.targets.tolist() == ex.targets
    assert tok.decode(shards[0].input_ids[1:-1]) == json.loads(corpus.read_text().splitlines()[0])["text"]
    layout = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert layout[0] == "index.json" and layout[1].startswith("offsets-0000") and layout[-1].startswith("tokens-")
    # offsets file = documents + 1 uint64; the tokens file = n_tokens little-endian uint16
    first = index["shards"][0]
    offsets = np.fromfile(tmp_path / "shards" / first["offsets"], dtype="<u8")
    assert offsets[0] == 0 and offsets[-1] == first["n_tokens"] and len(offsets) == first["documents"] + 1


@pytest.mark.parametrize("seq_len", [64, 512])  # ~3 documents a row, and ~20 (packed with numpy: _pack_spans)
def test_packed_batches_and_rank_slices_equal_the_jsonl_paths(corpus: Path, tmp_path: Path, seq_len: int,
                                                             monkeypatch):
    packed_with_numpy = []
    monkeypatch.setattr(Batcher, "_pack_spans", lambda self, n, f=Batcher._pack_spans: packed_with_numpy.append(n)
                        or f(self, n))
    if seq_len == 512:  # a document longer than a row, to be cut there too
        longer = tmp_path / "longer.jsonl"
        longer.write_text(corpus.read_text() + json.dumps({"text": "y" * 600}) + "\n")
        corpus = longer
    _tokenize(corpus, tmp_path / "shards")
    lists = _batcher(text_examples(build_char_tokenizer(), [json.loads(x) for x in corpus.read_text().splitlines()]),
                     seq_len)
    arrays = _batcher(TokenShards(tmp_path / "shards"), seq_len)
    for _ in range(40):  # several epochs of ~600 documents, with truncation of the long one
        a, b = lists.next_rows(8), arrays.next_rows(8)  # a Python step per document / numpy over the shards
        assert lists.state_dict() == arrays.state_dict()  # the same draws, the same waiting document
        for rank in range(2):  # the loop's rank slice: rows [rank * 4, (rank + 1) * 4)
            ta, tb = lists.collate(a[rank * 4:(rank + 1) * 4]), arrays.collate(b[rank * 4:(rank + 1) * 4])
            assert same_batch(ta, tb)
    assert lists.truncated == arrays.truncated > 0
    assert bool(packed_with_numpy) == (seq_len == 512)


def test_resume_state_continues_the_stream(corpus: Path, tmp_path: Path):
    _tokenize(corpus, tmp_path / "shards")
    shards = TokenShards(tmp_path / "shards")
    whole = _batcher(shards)
    first = _batcher(shards)
    for _ in range(7):
        whole.next_batch(4)
        first.next_batch(4)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    resumed = _batcher(TokenShards(tmp_path / "shards"))
    resumed.load_state_dict(state)
    for _ in range(5):
        assert same_batch(whole.next_batch(4), resumed.next_batch(4))


def test_pretrain_stage_on_shards_trains_like_on_jsonl(corpus: Path, tmp_path: Path):
    assert main(["data", "tokenize", str(corpus), str(tmp_path / "shards"), "--tokenizer", "instar-char"]) == 0
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "data": {"path": str(corpus)}, "train": {"steps": 4}},
                        "cpt": {"kind": "cpt", "after": ["pretrain"], "replay": 0.5, "train": {"steps": 3},
                                "data": {"generate": {"split": "cpt", "rows": 100}}}}
    recipe["defaults"]["eval"] = {}
    jsonl = write_recipe(tmp_path, recipe, "jsonl.yaml")
    recipe["run"]["name"] = "s"
    recipe["stages"]["pretrain"]["data"] = {"shards": str(tmp_path / "shards")}
    sharded = write_recipe(tmp_path, recipe, "shards.yaml")
    run_recipe(load_recipe(jsonl), quiet=True)
    run_recipe(load_recipe(sharded), quiet=True)
    for stage in ("pretrain", "cpt"):  # cpt replays the parent's data: shards there too
        la = [json.loads(x)["loss"] for x in (tmp_path / f"runs/t/{stage}/metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x)["loss"] for x in (tmp_path / f"runs/s/{stage}/metrics.jsonl").read_text().splitlines()]
        assert la == lb
        a = load_file(str(tmp_path / f"runs/t/{stage}/model/model.safetensors"))
        b = load_file(str(tmp_path / f"runs/s/{stage}/model/model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "runs/s/pretrain/model/instar.json").read_text())
    assert list(meta["data"]) == [str(tmp_path / "shards")]


def test_fingerprint_follows_the_shards_content(corpus: Path, tmp_path: Path):
    import shutil

    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "data": {"shards": "shards"}}}
    path = write_recipe(tmp_path, recipe)
    fps = []
    for shard_tokens in (2000, 900, 2000):  # same tokens, another layout, then the first again
        shutil.rmtree(tmp_path / "shards", ignore_errors=True)
        _tokenize(corpus, tmp_path / "shards", shard_tokens)
        fps.append(make_plan(load_recipe(path))[0].fingerprint)
    assert fps[0] != fps[1] and fps[0] == fps[2]


def test_missing_index_is_a_clear_error(corpus: Path, tmp_path: Path, capsys):
    _tokenize(corpus, tmp_path / "shards")
    (tmp_path / "shards/index.json").unlink()
    with pytest.raises(DataError, match=r"index.json: missing.*instar data tokenize"):
        TokenShards(tmp_path / "shards")
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "data": {"shards": "shards"}}}
    assert main(["plan", str(write_recipe(tmp_path, recipe))]) == 2
    assert "index.json: missing" in capsys.readouterr().err


def test_dtype_mismatch_is_a_clear_error(corpus: Path, tmp_path: Path):
    _tokenize(corpus, tmp_path / "shards")
    index_path = tmp_path / "shards/index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(index | {"dtype": "uint32"}))
    with pytest.raises(DataError, match=r"bytes, but index.json says .*\(uint32 tokens\)"):
        TokenShards(tmp_path / "shards")
    index["tokenizer"]["vocab_size"] = 100_000
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="dtype uint16 cannot hold ids of a 100000-token vocabulary"):
        TokenShards(tmp_path / "shards")


def test_tokenizer_mismatch_is_a_clear_error(corpus: Path, tmp_path: Path):
    _tokenize(corpus, tmp_path / "shards")
    other = build_char_tokenizer()
    other.add_tokens(["<tool>"])
    with pytest.raises(DataError, match=r"tokenized with 'instar-char'.*Tokenize again with this stage's tokenizer"):
        text_examples(other, TokenShards(tmp_path / "shards"))


def test_bad_tokenize_input_is_a_clear_error(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["data", "tokenize", str(bad), str(tmp_path / "out"), "--tokenizer", "instar-char"]) == 2
    assert "bad.jsonl:2: bad row" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))  # nothing half-written
    (tmp_path / "out").mkdir()
    assert main(["data", "tokenize", str(bad), str(tmp_path / "out"), "--tokenizer", "instar-char"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_shards_only_feed_text_kinds(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 50}}},
                        "sft": {"kind": "sft", "after": ["pretrain"], "data": {"shards": "somewhere"}}}
    with pytest.raises(RecipeError, match=r"stages.sft.data.shards: token shards hold pretraining text"):
        StageGraph(load_recipe(write_recipe(tmp_path, recipe)).recipe)
