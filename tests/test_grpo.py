"""The grpo kind: its arithmetic in closed form, sampling, and real stages that learn a reward."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.cli import main
from instar.data.tokenizer import build_char_tokenizer
from instar.eval.generate import decode_batch, greedy_pick, sampling_pick
from instar.graph.runner import run_recipe
from instar.config.load import load_recipe
from instar.models.build import model_from_config
from instar.methods.rl import group_advantages, k3_kl, per_token_loss, reduce_loss
from tests.conftest import tiny_recipe, write_recipe


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4, "group")
    first = (r[:4] - 0.25) / (r[:4].std() + 1e-4)
    assert torch.allclose(a[:4], first) and torch.equal(a[4:], torch.zeros(4))  # flat group: no signal
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(r, 4, "batch"), (r - r.view(2, 4).mean(1).repeat_interleave(4)) / (r.std() + 1e-4))


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.3, 0.1, 0.9]))
    r = ref - logp
    assert torch.allclose(k3_kl(logp, ref), torch.exp(r) - r - 1) and bool((k3_kl(logp, ref) >= 0).all())


def test_per_token_loss_clips_the_ratio():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    loss, info = per_token_loss(logp, old, torch.tensor([1.0]), None, clip_eps=0.2, beta=0.0)
    # positive advantage: the ratio is capped at 1.2 above, unclipped below
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.0]]))
    assert info["clipped"].tolist() == [[1.0, 0.0, 0.0]]
    loss, _ = per_token_loss(logp, old, torch.tensor([-1.0]), None, clip_eps=0.2, beta=0.0)
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.0]]))  # negative: floor at 0.8, no cap
    ref = torch.full((1, 3), -0.1)
    with_kl, info = per_token_loss(logp, old, torch.tensor([1.0]), ref, 0.2, beta=0.5)
    assert torch.allclose(with_kl, -torch.tensor([[1.2, 0.5, 1.0]]) + 0.5 * k3_kl(logp, ref))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_reduction_does_not_depend_on_the_split(loss_type):
    torch.manual_seed(0)
    loss, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    denominator = {"grpo": 6, "dapo": float(mask.sum()), "dr_grpo": 6 * 5}[loss_type]
    whole = reduce_loss(loss, mask, loss_type, denominator)
    parts = reduce_loss(loss[:2], mask[:2], loss_type, denominator) + reduce_loss(loss[2:], mask[2:], loss_type,
                                                                                   denominator)
    assert torch.allclose(whole, parts)
    if loss_type == "grpo":
        assert torch.allclose(whole, ((loss * mask).sum(1) / mask.sum(1)).mean())


def _model():
    tok = build_char_tokenizer()
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    return tok, model_from_config(cfg, tok, seed=0).eval()


def test_sampling_is_per_row_reproducible_and_respects_top_p():
    tok, model = _model()
    prompts = [tok.encode("12+3", add_special_tokens=False), tok.encode("7+88=", add_special_tokens=False)]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    with torch.inference_mode():
        both = decode_batch(model, prompts, 6, [tok.eos_token_id], tok.pad_token_id, sampling_pick(1.0, 1.0, gens()))
        alone = decode_batch(model, prompts[1:], 6, [tok.eos_token_id], tok.pad_token_id,
                             sampling_pick(1.0, 1.0, gens()[1:]))
        assert both[1] == alone[0]  # a row's sample does not depend on its batch-mates
        # top_p so small that only the argmax survives: sampling is greedy
        nucleus = decode_batch(model, prompts, 6, [tok.eos_token_id], tok.pad_token_id,
                               sampling_pick(1.0, 1e-6, gens()))
        greedy = decode_batch(model, prompts, 6, [tok.eos_token_id], tok.pad_token_id, greedy_pick)
    assert nucleus == greedy
    # the empirical distribution of one step matches softmax(logits / T)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    pick = sampling_pick(0.7, 1.0, [torch.Generator().manual_seed(i) for i in range(4000)])
    freq = torch.bincount(pick(logits), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.03)


def _grpo_recipe(**grpo) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {k: recipe["stages"][k] for k in ("pretrain", "sft")}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["defaults"]["eval"] = {}
    recipe["stages"]["grpo"] = {
        "kind": "grpo", "after": ["sft"], "data": {"generate": {"split": "prompts", "rows": 64}},
        "group_size": 8, "max_new_tokens": 6, "rewards": [{"fn": "tests.grpo_rewards:ones"}],
        "train": {"steps": 12, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-2, "checkpoint_every": 3},
        **grpo,
    }
    return recipe


def _metrics(run_dir: Path, stage: str = "grpo") -> list[dict]:
    return [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    path = write_recipe(folder, _grpo_recipe(beta=0.02, epochs=2))
    run_recipe(load_recipe(path), quiet=True)
    return path, folder / "runs" / "t"


def test_grpo_raises_its_reward_and_logs_its_metrics(learned):
    _, run_dir = learned
    rows = _metrics(run_dir)
    assert len(rows) == 12
    for key in ("reward/mean", "reward/std", "kl", "clip_fraction", "completion_length", "zero_std_groups",
                "loss", "grad_norm", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    first, last = sum(r["reward/mean"] for r in rows[:2]) / 2, sum(r["reward/mean"] for r in rows[-2:]) / 2
    assert last > first + 0.3, (first, last)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert any(r["kl"] > 0 for r in rows[1:])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "grpo" / "model")
    rollouts = [json.loads(x) for x in (run_dir / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 6 * 4 and {r["step"] for r in rollouts} == {1, 3, 5, 7, 9, 11}  # a rollout per 2 steps
    assert all(len(r["completions"]) == 8 and len(r["rewards"]) == 8 for r in rollouts)


def test_grpo_resumes_mid_rollout_to_identical_weights(learned, tmp_path):
    path, run_dir = learned
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    # Forget everything after the step-9 checkpoint (step 9 is in the middle of a 2-step rollout).
    shutil.rmtree(copy / "grpo" / "model")
    for ckpt in (copy / "grpo" / "checkpoints").iterdir():
        if ckpt.name != "step-00000009":
            shutil.rmtree(ckpt)
    assert (copy / "grpo" / "checkpoints" / "step-00000009" / "kind_rank0.pt").exists()
    recipe = load_recipe(path, [f"run.output_dir={tmp_path}", "run.name=copy"])
    run_recipe(recipe, quiet=True)
    want, got = load_file(str(run_dir / "grpo" / "model" / "model.safetensors")), \
        load_file(str(copy / "grpo" / "model" / "model.safetensors"))
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert [r["loss"] for r in _metrics(copy)] == [r["loss"] for r in _metrics(run_dir)]
    assert (copy / "grpo" / "rollouts.jsonl").read_text() == (run_dir / "grpo" / "rollouts.jsonl").read_text()


def test_accumulation_split_gives_the_same_step(tmp_path):
    recipe = _grpo_recipe(beta=0.02)
    recipe["stages"]["grpo"]["train"]["steps"] = 2
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path, ["run.name=a"]), quiet=True)
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")  # reuse pretrain and sft
    shutil.rmtree(tmp_path / "runs" / "b" / "grpo")
    run_recipe(load_recipe(path, ["run.name=b", "stages.grpo.train.micro_batch_size=4",
                                  "stages.grpo.train.grad_accum=1"]), quiet=True)
    a, b = _metrics(tmp_path / "runs" / "a"), _metrics(tmp_path / "runs" / "b")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
        assert x["reward/mean"] == y["reward/mean"]


def _fails(argv, capsys, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_bad_grpo_input(tmp_path, capsys):
    def run(name, **grpo):
        recipe = _grpo_recipe(**grpo)
        recipe["stages"]["grpo"]["train"]["steps"] = 1
        # one run name: pretrain and sft train once and are cached for the other cases
        return ["run", "--quiet", str(write_recipe(tmp_path, recipe, f"{name}.yaml")), "run.name=bad"]

    _fails(run("noref", beta=0.1, reference="nope"), capsys, "'nope' is not a stage of this recipe")
    _fails(run("badfn", rewards=[{"fn": "no_such_module:f"}]), capsys, "module 'no_such_module'")
    _fails(run("badname", rewards=[{"fn": "exactly"}]), capsys, "unknown reward 'exactly'; did you mean 'exact'?")
    _fails(run("drgrpo", loss_type="dr_grpo"), capsys, "scale_rewards: none")
    assert main(run("good")) == 0
    _fails(run("raises", rewards=[{"fn": "tests.grpo_rewards:raises"}]), capsys,
           "reward 'tests.grpo_rewards:raises' raised ValueError: reward server unavailable on prompt")
    # The failed attempt rewrote grpo's logs, so the good configuration's artifact went with them:
    # it is not "cached" next to a rollouts.jsonl that is not its own.
    assert not (tmp_path / "runs" / "bad" / "grpo" / "model").exists()
    assert main(run("good")) == 0 and (tmp_path / "runs" / "bad" / "grpo" / "model").is_dir()  # trained again
    _fails(run("nan", rewards=[{"fn": "tests.grpo_rewards:not_a_number"}]), capsys, "returned 'high' on prompt")
    long = run("long", max_new_tokens=60)
    _fails(long, capsys, "prompt row 1 is")
    assert main([*long, "stages.grpo.data.on_bad_row=skip"]) == 2  # nothing fits at all
    assert "no prompt fits" in capsys.readouterr().err
