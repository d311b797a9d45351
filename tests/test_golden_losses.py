"""Golden losses: the first 8 optimizer steps of a seeded tiny chain (pretrain -> cpt -> sft -> dpo, grpo;
fp32, one process) equal tests/assets/losses/<kind>.json to rel 1e-4, so a drift in a shared path
(packing, the block-diagonal mask, restarting positions, loss normalisation, SFT's assistant mask,
a kind's objective) fails here at once.

When a change of the numbers is meant, regenerate the fixtures and say why in the commit:

    python -m tests.golden_losses --write     # or: make golden

The recipe is tests/golden_losses.py::RECIPE; docs/testing.md lists the mutations this test catches.
"""

from __future__ import annotations

import pytest

from tests import golden_losses as golden
from tests.conftest import write_recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return golden.run_chain(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("kind", golden.KINDS)
def test_first_steps_equal_the_fixture(run_dir, kind):
    fixture = golden.load(kind)
    stage = {k: v for k, v in golden.RECIPE["stages"][kind].items() if k != "after"}
    assert fixture["stage"] == stage, f"the golden recipe changed: {golden.COMMAND}"
    problems = golden.differences(kind, golden.steps_of(run_dir, kind), fixture["steps"])
    assert not problems, "\n".join(problems) + f"\nif the change is meant: {golden.COMMAND}"


@pytest.mark.dist
def test_zero2_on_two_ranks_equals_the_one_process_fixture(tmp_path):
    """The same global batch (8 rows) on 2 ranks, micro-batches of 4 each: the pretrain fixture again."""
    from tests.test_distributed import _run

    recipe = golden.recipe(("pretrain",), distributed={"engine": "deepspeed", "zero_stage": 2, "nproc_per_node": 2})
    out = _run(["run", str(write_recipe(tmp_path, recipe))], tmp_path)
    assert "launcher: torchrun, 2 rank(s)" in out
    got = golden.steps_of(tmp_path / "runs" / "golden", "pretrain")
    problems = golden.differences("pretrain", got, golden.load("pretrain")["steps"])
    assert not problems, "\n".join(problems)
