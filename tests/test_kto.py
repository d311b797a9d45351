"""The kto kind: its losses in closed form, TRL's KTOTrainer end to end on a batch (tokens, layout,
KL estimate, loss and gradients), real stages on one process and on ZeRO-3 ranks, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instar.cli import main
from instar.config.schema import DistributedConfig, OptimizerConfig, TrainConfig
from instar.data.packing import collate_rows
from instar.data.tokenizer import build_char_tokenizer
from instar.trainer.batch import BatchLayout
from instar.kinds.kto import KtoSpec
from instar.methods.kto import KTO_LOSSES
from instar.trainer.kinds.kto import KtoKind
from instar.trainer.single_engine import SingleEngine
from tests.conftest import tiny_recipe, write_recipe

TOK = build_char_tokenizer()
FEEDBACK = [("12+34", "46", True), ("7*8", "54 or so", False), ("9-3", "6", True), ("100/4", "2", False),
            ("2^5", "32", True), ("sqrt 81", "nine?", False)]


def test_kto_losses_closed_form():
    r, desirable = torch.tensor([0.5, -0.3, 1.2, 0.0]), torch.tensor([True, False, True, False])
    spec = KtoSpec(kind="kto", beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [1.5 * (1 - sig(0.5 * (0.5 - 0.2))), 0.7 * (1 - sig(0.5 * (0.2 + 0.3))),
            1.5 * (1 - sig(0.5 * (1.2 - 0.2))), 0.7 * (1 - sig(0.5 * 0.2))]
    assert KTO_LOSSES["kto"](r, 0.2, desirable, spec).tolist() == pytest.approx(want, abs=1e-6)
    want = [1.5 * (1 - sig(0.25)), 0.7 * sig(-0.15), 1.5 * (1 - sig(0.6)), 0.7 * 0.5]
    assert KTO_LOSSES["apo_zero_unpaired"](r, 0.2, desirable, spec).tolist() == pytest.approx(want, abs=1e-6)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("loss", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("per_row", [1, 3])
def test_kto_equals_trl_end_to_end(tmp_path, loss, per_row):
    """The kind's own examples (mismatched completions included), layout (`per_row` completions
    packed in a row), reference log-probs, KL estimate, loss and gradients equal TRL's KTOTrainer on
    its own collated batch of the same rows, with the same policy and reference models."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    policy, reference = _tiny_llama(0), _tiny_llama(2).eval().requires_grad_(False)
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": label} for p, c, label in FEEDBACK]
    args = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, bf16=False,
                     loss_type=loss, beta=0.5, desirable_weight=1.3, undesirable_weight=0.8,
                     per_device_train_batch_size=len(rows))
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=TOK)
    keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
    inputs = trainer.data_collator([{k: row[k] for k in keys if k in row} for row in trainer.train_dataset])
    # TRL's completion runs to the end of the chat template, one "\n" past EOS; instar's ends at EOS.
    for prefix in ("", "KL_") if "KL_input_ids" in inputs else ("",):
        ids, mask = inputs[f"{prefix}input_ids"], inputs[f"{prefix}completion_mask"]
        past_eos = (ids == TOK.eos_token_id).int().cumsum(-1).roll(1, -1).clamp(max=1).bool() & mask.bool()
        past_eos[:, 0] = False
        inputs[f"{prefix}completion_mask"] = mask.masked_fill(past_eos, 0)
    params = [p for p in policy.parameters() if p.requires_grad]
    expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    expected_grads = torch.autograd.grad(expected, params)

    spec = KtoSpec(kind="kto", loss=loss, beta=0.5, desirable_weight=1.3, undesirable_weight=0.8,
                   reference_logps="on_the_fly", train=TrainConfig(seq_len=128), data={"path": "x.jsonl"},
                   distributed=DistributedConfig(device="cpu"), precision="fp32", optimizer=OptimizerConfig())
    kind = KtoKind(SimpleNamespace(spec=spec, name="kto", rank=0, quiet=True))
    ours = [{"prompt": p, "completion": c, "label": label} for p, c, label in FEEDBACK]
    (examples,), _ = kind.build_sources(TOK, [ours])
    kind._reference = reference
    engine = SingleEngine(policy, spec, stage="kto")
    grouped = [examples[i:i + per_row] for i in range(0, len(examples), per_row)]
    batcher = SimpleNamespace(collate=lambda r: collate_rows(r, TOK.pad_token_id,
                                                             max(sum(len(e.input_ids) for e in row) for row in r)))
    layout = BatchLayout(micro_batch_size=len(grouped), grad_accum=1, world_size=1)
    work = kind.step_batches(engine, batcher, grouped, grouped, layout, step=0)
    ours_loss, metrics = kind.loss(engine.model, work.batches[0], work.denominator)
    assert float(ours_loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
    if loss == "kto":
        assert work.metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)
        assert work.metrics["kl"] > 0  # the two random models disagree: z is not clamped to 0 here
    else:  # a loss without z never runs the mismatched completions (TRL's calculate_kl=False)
        assert "kl" not in work.metrics
    chosen = metrics["rewards/chosen"]
    assert float(chosen.total / chosen.count) == pytest.approx(trainer._metrics["train"]["rewards/chosen"][-1], abs=1e-5)
    for mine, theirs in zip(torch.autograd.grad(ours_loss, params), expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def _kto_recipe(**kto) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {k: recipe["stages"][k] for k in ("pretrain", "sft")}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["defaults"]["eval"] = {}
    recipe["stages"]["kto"] = {"kind": "kto", "after": ["sft"], "data": {"generate": {"split": "dpo", "rows": 48}},
                               "beta": 0.5, "train": {"steps": 6, "lr": 1e-2}, **kto}
    return recipe


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "kto" / "metrics.jsonl").read_text().splitlines()]


def test_kto_stage_starts_at_half_and_separates_the_rewards(tmp_path: Path):
    # few pairs, many epochs: the desirable and undesirable rewards must come apart
    recipe = _kto_recipe(data={"generate": {"split": "dpo", "rows": 8}},
                         train={"steps": 30, "lr": 3e-3, "warmup_ratio": 0, "micro_batch_size": 8})
    path = write_recipe(tmp_path, recipe)
    assert main(["run", "--quiet", str(path)]) == 0
    rows = _metrics(tmp_path / "runs" / "t")
    # The policy starts as its reference: r = 0 and z = 0, so every completion's loss is 1 - σ(0).
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    late = rows[-5:]
    assert sum(r["loss"] for r in late) / 5 < 0.45
    assert sum(r["rewards/chosen"] - r["rewards/rejected"] for r in late) / 5 > 0.2
    # The cached reference log-probs (the default) give what the reference computes on the fly.
    assert main(["run", "--quiet", str(path), "run.name=fly", "stages.kto.reference_logps=on_the_fly"]) == 0
    fly = _metrics(tmp_path / "runs" / "fly")
    assert [r["loss"] for r in fly] == pytest.approx([r["loss"] for r in rows], rel=1e-5)


@pytest.mark.parametrize("override,needle", [
    ("stages.kto.loss=ktoo", "stages.kto.loss: unknown KTO loss 'ktoo'; did you mean 'kto'?"),
    ("stages.kto.reference=nope", "stages.kto.reference: 'nope' is not a stage of this recipe"),
])
def test_bad_kto_settings(tmp_path: Path, capsys, override, needle):
    assert main(["validate", str(write_recipe(tmp_path, _kto_recipe())), override]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_bad_kto_rows(tmp_path: Path, capsys):
    data = tmp_path / "fb.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "completion": "2", "label": True, "chosen": "2"}) + "\n")
    recipe = _kto_recipe(data={"path": str(data)})
    assert main(["run", "--quiet", str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err
    assert "fb.jsonl:1" in err and "not a mix" in err and "Traceback" not in err, err
    data.write_text(json.dumps({"prompt": "1+1", "completion": "2", "label": True}) + "\n")
    assert main(["run", "--quiet", str(write_recipe(tmp_path, recipe))]) == 2
    assert "KTO needs at least 2 completions" in capsys.readouterr().err


@pytest.mark.dist
def test_kto_on_zero3_ranks_equals_one_process(tmp_path: Path):
    """Partitioned policy and reference, the KL estimate's collective forwards: every logged metric
    on 2 ZeRO-3 ranks equals one process's (the same global batch)."""
    recipe = _kto_recipe(reference="pretrain")  # a reference unlike the policy: the KL estimate is > 0
    recipe["stages"]["kto"]["train"].update(micro_batch_size=2, grad_accum=2)
    recipe["stages"]["kto"]["distributed"] = {"engine": "deepspeed", "zero_stage": 3, "nproc_per_node": 2,
                                              "deepspeed_config": {"zero_optimization": {
                                                  "stage3_param_persistence_threshold": 0}}}
    path = write_recipe(tmp_path, recipe)
    assert main(["run", "--quiet", str(path), "run.name=one", "stages.kto.distributed.engine=single",
                 "stages.kto.distributed.nproc_per_node=1", "stages.kto.distributed.deepspeed_config={}",
                 "stages.kto.train.micro_batch_size=4"]) == 0
    assert main(["run", "--quiet", str(path), "run.name=two"]) == 0
    skip = {"tokens_per_s", "data_share", "peak_mem_mb"}
    one, two = _metrics(tmp_path / "runs" / "one"), _metrics(tmp_path / "runs" / "two")
    assert len(one) == len(two) == 6 and all(r["kl"] > 0 for r in one)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a.keys() - skip:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
