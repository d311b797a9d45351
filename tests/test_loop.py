"""The loop's guards and arithmetic: non-finite steps, gradient accumulation, cadences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.cli import main
from instar.config.load import load_recipe
from instar.errors import TrainingError
from instar.graph.runner import run_recipe
from tests.conftest import tiny_recipe, write_recipe


def _one_stage(steps: int, **train) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps, **train}
    recipe["defaults"]["eval"] = {}
    return recipe


def test_non_finite_steps_are_skipped_then_the_stage_stops(tmp_path: Path, capsys):
    # An absurd learning rate blows the weights up after one step; every later step is non-finite.
    path = write_recipe(tmp_path, _one_stage(20, lr=1e12, warmup_ratio=0, max_bad_steps=3))
    with pytest.raises(TrainingError, match="3 optimizer steps in a row had a non-finite loss"):
        run_recipe(load_recipe(path), quiet=True)
    records = [json.loads(x) for x in (tmp_path / "runs/t/pretrain/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records][-3:] == [True, True, True]
    assert not (tmp_path / "runs/t/pretrain/model").exists()
    assert main(["run", str(path)]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path):
    """8 rows in one micro-batch == 2 micro-batches of 4: the loss is normalised by the step's
    target tokens, not averaged per micro-batch."""
    common = {"packing": False, "warmup_ratio": 0, "max_grad_norm": None}
    big = write_recipe(tmp_path, _one_stage(4, micro_batch_size=8, grad_accum=1, **common), "big.yaml")
    acc = write_recipe(tmp_path, _one_stage(4, micro_batch_size=4, grad_accum=2, **common), "acc.yaml")
    run_recipe(load_recipe(big, ["run.name=big"]), quiet=True)
    run_recipe(load_recipe(acc, ["run.name=acc"]), quiet=True)
    a = load_file(str(tmp_path / "runs/big/pretrain/model/model.safetensors"))
    b = load_file(str(tmp_path / "runs/acc/pretrain/model/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    la = [json.loads(x)["loss"] for x in (tmp_path / "runs/big/pretrain/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "runs/acc/pretrain/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_eval_and_checkpoint_cadence(tmp_path: Path):
    recipe = _one_stage(10, checkpoint_every=4, keep_checkpoints=1)
    recipe["defaults"]["eval"] = tiny_recipe()["defaults"]["eval"] | {"every": 5}
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path), quiet=True)
    stage = tmp_path / "runs/t/pretrain"
    assert [json.loads(x)["step"] for x in (stage / "eval.jsonl").read_text().splitlines()] == [5, 10]
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step-00000008"]


def test_bf16_autocast_trains(tmp_path: Path):
    path = write_recipe(tmp_path, _one_stage(3))
    run_recipe(load_recipe(path, ["defaults.precision=bf16"]), quiet=True)
    weights = load_file(str(tmp_path / "runs/t/pretrain/model/model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_data_arithmetic_command(tmp_path: Path, capsys):
    assert main(["data", "arithmetic", str(tmp_path / "d")]) == 0
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == ["cpt.jsonl", "dpo.jsonl", "heldout.jsonl", "pretrain.jsonl", "prompts.jsonl", "sft.jsonl",
                     "sft_steps.jsonl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path):
    from instar.errors import RecipeError

    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["defaults"]["distributed"] = {"device": "cuda"}
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError, match=r"stages\.pretrain\.distributed\.device=cuda.*no CUDA device"):
        run_recipe(load_recipe(path), quiet=True)


def test_single_document_rows_use_plain_causal_attention(tmp_path: Path):
    """Rows that are one document each (long pretraining text cut to seq_len) need no mask: SDPA
    then takes its causal (flash) path; the losses equal the block-mask path's."""
    from instar.data.packing import Batcher, block_diagonal_mask, causal_example
    from instar.data.sampler import EpochSampler, MixtureSampler
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.build import model_from_config
    from instar.trainer.losses import attention_mask, forward_logits

    tok = build_char_tokenizer()
    model = model_from_config(tiny_recipe()["model"]["config"], tok, seed=0)
    docs = [causal_example(tok.encode("12+34=46\n" * 20)) for _ in range(4)]
    batcher = Batcher([docs], MixtureSampler([EpochSampler(4, seed=0)], [1.0], seed=0), 64, True, tok.pad_token_id)
    batch = batcher.next_batch(2)
    assert attention_mask(model, batch) is None
    masked = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   attention_mask=block_diagonal_mask(batch.doc_ids, torch.float32)).logits
    torch.testing.assert_close(forward_logits(model, batch), masked, atol=1e-5, rtol=1e-5)

    # Right padding after one document: the same at every real token; two documents need the mask.
    short = causal_example(tok.encode("12+34=46\n"))
    padded = Batcher([[short]], MixtureSampler([EpochSampler(1, seed=0)], [1.0], seed=0), 64, False,
                     tok.pad_token_id)
    batch = padded.collate([[short], [docs[0].truncated(64)]])
    assert attention_mask(model, batch) is None
    real = batch.doc_ids >= 0
    masked = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   attention_mask=block_diagonal_mask(batch.doc_ids, torch.float32)).logits
    torch.testing.assert_close(forward_logits(model, batch)[real], masked[real], atol=1e-5, rtol=1e-5)
    assert attention_mask(model, batcher.collate([[short, short]])) is not None
