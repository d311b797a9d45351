"""SFT input transforms (`transforms: [{name: mask_inputs, ...}]`): only learnt input tokens change,
targets never do, and the same rows are masked whatever the ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instar.cli import main
from instar.data.chat import chat_examples
from instar.data.example import IGNORE
from instar.data.packing import collate_rows
from instar.data.tokenizer import build_char_tokenizer
from instar.methods.input_transforms import build_transforms, parse_transforms
from tests.conftest import tiny_recipe, write_recipe

TOK = build_char_tokenizer()
CONVS = [{"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]}
         for a, b in [(12, 34), (7, 8), (100, 250), (9, 9), (45, 55), (3, 1000)]]


def _batch():
    examples = chat_examples(TOK, CONVS, "assistant")
    rows = [[ex] for ex in examples]
    return collate_rows(rows, TOK.pad_token_id, max(len(ex.input_ids) for ex in examples))


def _mask(rate: float, ramp: float = 0.0, total: int = 10):
    specs = parse_transforms([{"name": "mask_inputs", "rate": rate, "ramp": ramp}])
    return build_transforms(specs, TOK, seed=7, total_steps=total)[0]


def test_only_learnt_inputs_are_masked_and_targets_stay():
    batch = _batch()
    out = _mask(1.0)(batch, step=3, first_row=0)
    learnt = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    learnt[:, 1:] = batch.targets[:, :-1] != IGNORE
    assert learnt.any()
    assert torch.equal(out.input_ids[learnt], torch.full((int(learnt.sum()),), TOK.pad_token_id))
    assert torch.equal(out.input_ids[~learnt], batch.input_ids[~learnt])  # the prompt is never touched
    for key in ("targets", "position_ids", "doc_ids"):
        assert torch.equal(getattr(out, key), getattr(batch, key))
    half = _mask(0.5)(batch, step=3, first_row=0).input_ids
    changed = (half != batch.input_ids) & learnt
    assert 0 < int(changed.sum()) < int(learnt.sum())


def test_rows_are_masked_by_their_global_index_and_the_rate_ramps():
    batch, mask = _batch(), _mask(0.5)
    whole = mask(batch, step=2, first_row=0).input_ids
    top = mask(batch.rows(slice(0, 3)), 2, 0).input_ids
    bottom = mask(batch.rows(slice(3, None)), 2, 3).input_ids
    assert torch.equal(torch.cat([top, bottom]), whole)  # rank 0 and rank 1's halves = one process
    assert not torch.equal(mask(batch, step=3, first_row=0).input_ids, whole)  # new draws each step
    ramped = _mask(0.4, ramp=0.5, total=10)
    assert [ramped.rate_at(s) for s in (0, 1, 5, 9)] == pytest.approx([0.0, 0.08, 0.4, 0.4])


def _sft_recipe(**sft) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "sft": recipe["stages"]["sft"]}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["stages"]["pretrain"]["train"] = {"steps": 2}
    recipe["stages"]["sft"].update(sft)
    recipe["defaults"]["eval"] = {}
    return recipe


def test_bad_transforms_are_refused_at_load(tmp_path: Path, capsys):
    for transforms, needle in [([{"name": "mask_input", "rate": 0.1}], "did you mean 'mask_inputs'?"),
                               ([{"name": "mask_inputs", "rate": 2}], "transforms[0] (mask_inputs): rate"),
                               ([{"rate": 0.1}], "transforms[0]: give a mapping with `name`")]:
        assert main(["validate", str(write_recipe(tmp_path, _sft_recipe(transforms=transforms)))]) == 2
        err = capsys.readouterr().err
        assert needle in err and "stages.sft.transforms" in err and "Traceback" not in err, err


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
def test_masked_sft_on_two_ranks_equals_one_process(tmp_path: Path):
    """The masks follow the global row, and the denominator the step's targets: ZeRO-2 on 2 ranks
    trains exactly what one process does, and masking changes the losses."""
    recipe = _sft_recipe(transforms=[{"name": "mask_inputs", "rate": 0.5}])
    recipe["stages"]["sft"]["distributed"] = {"engine": "deepspeed", "zero_stage": 2, "nproc_per_node": 2}
    recipe["stages"]["sft"]["train"] = {"steps": 4, "micro_batch_size": 2, "grad_accum": 2}
    path = write_recipe(tmp_path, recipe)
    single = ["stages.sft.distributed.engine=single", "stages.sft.distributed.nproc_per_node=1",
              "stages.sft.train.micro_batch_size=4"]
    assert main(["run", str(path), "--quiet", "run.name=one", *single]) == 0
    assert main(["run", str(path), "--quiet", "run.name=two"]) == 0
    assert main(["run", str(path), "--quiet", "run.name=plain", *single, "stages.sft.transforms=[]"]) == 0
    one, two, plain = (_losses(tmp_path / "runs" / n) for n in ("one", "two", "plain"))
    assert two == pytest.approx(one, rel=1e-5)
    assert one[0] != pytest.approx(plain[0], rel=1e-6)  # same weights at step 1, masked inputs
