"""instar's post-training objectives against TRL's own code (trl==1.16.0, the `dev` extra).

Every comparison builds a real TRL trainer (DPOTrainer, GRPOTrainer, SFTTrainer) on a tiny Llama
and the instar-char tokenizer and calls the trainer's own loss / data code; instar's functions get
the very same log-probabilities, advantages and masks. Nothing of TRL is re-implemented here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="TRL is a dev dependency: pip install -c constraints.txt -e '.[dev]'")

from datasets import Dataset  # noqa: E402  (after the importorskip above)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from instar.data.packing import IGNORE  # noqa: E402
from instar.data.tokenizer import build_char_tokenizer  # noqa: E402
from instar.methods.preference import preference_losses  # noqa: E402
from instar.data.chat import chat_examples  # noqa: E402
from instar.methods.rl import LOSS_TYPES, group_advantages, per_token_loss, reduce_loss, token_logps  # noqa: E402

TOK = build_char_tokenizer()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=TOK.pad_token_id, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def common_args(tmp_path) -> dict:
    return {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "disable_tqdm": True,
            "bf16": False}  # TRL turns bf16 autocast on by default (also on CPU); compare in fp32


# ---------------------------------------------------------------------------------------------- DPO

PREFERENCE_ROWS = [
    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}]}
    for q, c, r in [("12+34", "46", "47"), ("7*8", "56", "54 or so"), ("9-3", "6", "three"),
                    ("100/4", "25", "2"), ("2^5", "32", "10"), ("sqrt 81", "9", "nine?")]
]


def _completion_logp_sums(trainer, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π(completion token) per row of TRL's [chosen; rejected] batch, from the same fused-head
    call TRL's loss makes (it computes log-probs in fp32 whatever the model's dtype), checked against
    a plain log_softmax over the full logits."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              labels=labels, fused_lm_head=True, use_cache=False).log_probs
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               use_cache=False).logits
    plain = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    mask = inputs["completion_mask"][:, 1:]
    torch.testing.assert_close(fused, plain * mask, atol=1e-5, rtol=0)
    return fused.sum(dim=1), mask.sum(dim=1).to(fused.dtype)


@pytest.mark.parametrize("loss,beta,label_smoothing", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
    ("hinge", 0.1, 0.0), ("hinge", 1.0, 0.0),
])
def test_dpo_losses_equal_trl(tmp_path, loss, beta, label_smoothing):
    # TRL 1.16's `sigmoid` has no label smoothing any more (its `robust` loss is a different, unbiased
    # estimator). instar's smoothed sigmoid is conservative DPO, −(1−ε)·logσ(βh) − ε·logσ(−βh), which
    # TRL 1.16 writes only inside its `aot` loss; `aot` sorts the batch's log-ratios, and sorting a
    # batch of one pair changes nothing, so each pair goes through TRL alone.
    trl_loss = "aot" if label_smoothing else loss
    model = tiny_llama()
    args = DPOConfig(**common_args(tmp_path), loss_type=[trl_loss], beta=beta, label_smoothing=label_smoothing,
                     precompute_ref_log_probs=True, per_device_train_batch_size=len(PREFERENCE_ROWS))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PREFERENCE_ROWS),
                         processing_class=TOK)
    trainer.model.train()
    spec = SimpleNamespace(loss=loss, beta=beta, label_smoothing=label_smoothing, alpha=0.8, nll_coef=0.0)
    generator = torch.Generator().manual_seed(0)
    hinge_sides = set()
    for row in trainer.train_dataset:
        inputs = trainer.data_collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        sums, counts = _completion_logp_sums(trainer, inputs)
        # Random reference log-probs around the policy's: h spreads over both signs and both sides
        # of the hinge's kink and of IPO's target 1/(2β).
        ref = sums + 12.0 * torch.randn(2, generator=generator, dtype=torch.float64)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:1], ref[1:]
        expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        ours, _, _ = preference_losses(sums[:1], sums[1:], ref[:1], ref[1:], counts[:1], counts[1:], spec)
        assert float(ours[0].detach()) == pytest.approx(float(expected.detach()), abs=1e-6, rel=0)
        h = float((sums[0] - ref[0]) - (sums[1] - ref[1]))
        hinge_sides.add(beta * h < 1)
    if loss == "hinge":
        assert hinge_sides == {True, False}, "the random reference should put pairs on both sides of the hinge"


@pytest.mark.parametrize("pairs_per_row", [1, 3])
def test_dpo_pair_logps_equal_trl_end_to_end(tmp_path, pairs_per_row):
    """Tokenization, layout and log-probs together: instar's summed completion log-probs per pair
    (the DPO kind's own examples, collated into rows of `pairs_per_row` packed pairs, through
    forward_logits and segment_logps) equal TRL's per-pair sums (DPOTrainer.compute_ref_log_probs,
    the computation its loss makes for the policy) for its own collated [chosen; rejected] batch
    of the same rows, on the same model."""
    from instar.data.packing import collate_rows
    from instar.trainer.kinds.dpo import DpoKind, segment_logps
    from instar.trainer.losses import forward_logits

    model = tiny_llama().eval()
    args = DPOConfig(**common_args(tmp_path), precompute_ref_log_probs=True,  # else it loads a reference by name
                     per_device_train_batch_size=len(PREFERENCE_ROWS))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PREFERENCE_ROWS),
                         processing_class=TOK)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    inputs = trainer.data_collator([{k: row[k] for k in keys} for row in trainer.train_dataset])
    # TRL's completion runs to the end of the chat template, one "\n" past EOS; instar's loss ends at
    # EOS. Everything up to EOS must agree, so TRL's own sum is taken over that part.
    mask = inputs["completion_mask"]
    past_eos = (inputs["input_ids"] == TOK.eos_token_id).int().cumsum(-1).roll(1, -1).clamp(max=1).bool() & mask.bool()
    past_eos[:, 0] = False
    assert {TOK.decode(ids[m]) for ids, m in zip(inputs["input_ids"], past_eos)} == {"\n"}
    inputs["completion_mask"] = mask.masked_fill(past_eos, 0)
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, inputs)

    ctx = SimpleNamespace(spec=SimpleNamespace(train=SimpleNamespace(seq_len=128), negatives=None,
                                               data=SimpleNamespace(on_bad_row="error")),
                          rank=0, name="dpo", quiet=True)
    ours = [{"prompt": row["prompt"], **{k: row[k][0]["content"] for k in ("chosen", "rejected")}}
            for row in PREFERENCE_ROWS]  # instar's row format: the answers as strings
    (examples,), _ = DpoKind(ctx).build_sources(TOK, [ours])
    rows = [examples[i:i + pairs_per_row] for i in range(0, len(examples), pairs_per_row)]
    batch = collate_rows(rows, TOK.pad_token_id, max(sum(len(ex.input_ids) for ex in row) for row in rows))
    with torch.no_grad():
        chosen, rejected, _, _ = segment_logps(forward_logits(model, batch), batch)
    torch.testing.assert_close(chosen.double(), trl_chosen.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected.double(), trl_rejected.double(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- GRPO

GROUP = 4
MAX_NEW = 8
PROMPTS = [{"prompt": [{"role": "user", "content": q}]} for q in ("12+34", "7*8", "9-3")]


def digit_reward(completions, **kwargs) -> list[float]:
    """A deterministic reward that differs between completions (so group std is not zero)."""
    return [float(sum(ord(ch) for ch in c[0]["content"]) % 13) / 4 for c in completions]


def grpo_trainer(tmp_path, beta, loss_type, scale_rewards, temperature=0.7) -> GRPOTrainer:
    model_dir = tmp_path / "policy"
    tiny_llama(seed=1).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    args = GRPOConfig(**common_args(tmp_path / "out"), num_generations=GROUP,
                      per_device_train_batch_size=GROUP * len(PROMPTS), max_completion_length=MAX_NEW,
                      temperature=temperature, beta=beta, loss_type=loss_type, scale_rewards=scale_rewards,
                      epsilon=0.2, epsilon_high=0.28, seed=0,
                      # TRL 1.16 multiplies the k3 KL by the importance ratio by default (DeepSeek-V3.2's
                      # unbiased KL gradient); instar's `per_token_loss` is the GRPO paper's plain β·k3, so
                      # the comparison switches that off (same value on-policy, not the same gradient).
                      use_bias_correction_kl=False)
    # From a path: with beta > 0 TRL loads its reference model from the same place.
    trainer = GRPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(PROMPTS),
                          processing_class=TOK, reward_funcs=digit_reward)
    trainer.model.train()
    # The training loop sets this before each step (transformers Trainer); one micro-batch per step here.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def rollout(trainer) -> dict:
    """TRL's own generation + reward + advantage step on one generation batch (groups laid out in order)."""
    batch = [row for row in PROMPTS for _ in range(GROUP)]
    return trainer._generate_and_score_completions(batch)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl(tmp_path, scale_rewards):
    trainer = grpo_trainer(tmp_path, beta=0.0, loss_type="grpo", scale_rewards=scale_rewards)
    out = rollout(trainer)
    rewards = torch.tensor(list(trainer._logs["rewards"]["digit_reward"]), dtype=torch.float32)
    assert rewards.view(-1, GROUP).std(dim=1).min() > 0, "each group needs distinct rewards for this test"
    ours = group_advantages(rewards, GROUP, scale_rewards)
    torch.testing.assert_close(ours, out["advantages"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_grpo_loss_equals_trl(tmp_path, beta, loss_type, scale_rewards):
    trainer = grpo_trainer(tmp_path, beta=beta, loss_type=loss_type, scale_rewards=scale_rewards)
    inputs = rollout(trainer)
    mask = inputs["completion_mask"].clone()
    # Completions of different lengths (as if each had stopped at EOS), so grpo/dapo/dr_grpo differ.
    lengths = torch.tensor([1, 3, 5, 8, 2, 8, 7, 4, 6, 8, 3, 5])[: mask.shape[0]]
    mask = mask * (torch.arange(MAX_NEW)[None, :] < lengths[:, None])
    inputs["completion_mask"], inputs["num_items_in_batch"] = mask, mask.sum()

    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], mask], dim=1)
    with torch.no_grad():
        # instar's own log-probs (temperature-scaled logits) agree with TRL's fused head.
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, MAX_NEW)
        logits = trainer.model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        targets = inputs["completion_ids"].masked_fill(mask == 0, IGNORE)
        ours_logp = token_logps(logits[:, -MAX_NEW - 1 : -1], targets, trainer.temperature)
        torch.testing.assert_close(ours_logp, logp * mask, atol=1e-5, rtol=0)

    # Off-policy old log-probs (ratios well outside the clip range) and a reference that has drifted.
    generator = torch.Generator().manual_seed(1)
    inputs["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=generator)
    if beta:
        inputs["ref_per_token_logps"] = logp + 0.5 * torch.randn(logp.shape, generator=generator)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    expected = trainer._compute_loss(trainer.model, inputs)
    expected_grads = torch.autograd.grad(expected, params)

    # instar's objective on the log-probs TRL's loss starts from (same call, with gradient).
    logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, MAX_NEW)
    loss, info = per_token_loss(logp, inputs["old_per_token_logps"], inputs["advantages"],
                                inputs.get("ref_per_token_logps"), clip_eps=0.2, beta=beta, clip_eps_high=0.28)
    assert info["clipped"][mask.bool()].any(), "some tokens should be clipped for the test to mean something"
    # The denominator as the grpo kind computes it for a step (what TRL divides by must come out).
    denominator = LOSS_TYPES[loss_type].denominator(completions=mask.shape[0], tokens=float(mask.sum()),
                                                    max_new_tokens=MAX_NEW)
    ours = reduce_loss(loss, mask, loss_type, denominator)
    assert float(ours) == pytest.approx(float(expected), abs=1e-6, rel=0)
    for mine, theirs in zip(torch.autograd.grad(ours, params), expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SFT

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "12+34"}, {"role": "assistant", "content": "46"}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "7*8"},
                  {"role": "assistant", "content": "56"}, {"role": "user", "content": "and 7*9?"},
                  {"role": "assistant", "content": "63"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                  {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}]},
]


def test_sft_assistant_tokens_equal_trl(tmp_path):
    args = SFTConfig(**common_args(tmp_path), assistant_only_loss=True, max_length=None, packing=False)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(CONVERSATIONS),
                         processing_class=TOK)
    examples = chat_examples(TOK, CONVERSATIONS, "assistant")
    for row, example in zip(trainer.train_dataset, examples, strict=True):
        assert example.input_ids == row["input_ids"]
        # TRL keeps labels aligned with the inputs and lets the model shift them; instar stores
        # targets already shifted (targets[i] is the token after input i), so labels[1:] = targets[:-1].
        assert example.targets[:-1] == row["labels"][1:]
        assert example.targets[-1] == IGNORE and row["labels"][0] == IGNORE
        # What both learn: each assistant answer and its EOS, never "A: " nor the newline after EOS.
        learnt = TOK.decode([t for t in example.targets if t != IGNORE])
        answers = "".join(m["content"] + TOK.eos_token for m in CONVERSATIONS[examples.index(example)]["messages"]
                          if m["role"] == "assistant")
        assert learnt == answers


def test_sft_last_turn_equals_trl_prompt_completion(tmp_path):
    """instar's `loss_on: last_turn` is TRL's conversational prompt/completion format with both
    completion_only_loss and assistant_only_loss (the completion minus the template's trailing newline)."""
    rows = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in CONVERSATIONS]
    args = SFTConfig(**common_args(tmp_path), assistant_only_loss=True, completion_only_loss=True,
                     max_length=None, packing=False)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(rows), processing_class=TOK)
    for row, example in zip(trainer.train_dataset, chat_examples(TOK, CONVERSATIONS, "last_turn"), strict=True):
        assert example.input_ids == row["input_ids"]
        assert example.targets[:-1] == row["labels"][1:]
