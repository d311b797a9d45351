"""GRPO's shared-prompt forward (each group's prompt run once, its KV cache repeated for the
group's completions) gives the whole rows' log-probs and gradients, up to float rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instar.data.example import IGNORE, Example
from instar.data.packing import collate_rows
from instar.trainer.kinds.grpo import RolloutBatch, shared_prompt_logps, shares_prompts
from instar.trainer.losses import forward_logits
from instar.methods.rl import token_logps


def _model(tie: bool, kv: int = 2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=tie, pad_token_id=0,
                      max_position_embeddings=128)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.train()


def _batch(prompt_lens, completion_lens, group, seed=0):
    """A rollout micro-batch laid out as GrpoKind._make_rollout lays it out."""
    g = torch.Generator().manual_seed(seed)
    sequences, plens = [], []
    for i, n in enumerate(completion_lens):
        if i % group == 0:
            prompt = torch.randint(1, 61, (prompt_lens[i // group],), generator=g).tolist()
        ids = torch.randint(1, 61, (n,), generator=g).tolist()
        sequences.append(Example(prompt + ids, [IGNORE] * (len(prompt) - 1) + ids + [IGNORE]))
        plens.append(len(prompt))
    batch = collate_rows([[s] for s in sequences], 0, max(len(s.input_ids) for s in sequences))
    return batch.extend(RolloutBatch, prompt_lens=torch.tensor(plens), completion_lens=torch.tensor(completion_lens))


CASES = {
    "equal_prompts": ([9, 9], [5, 5, 5, 5, 5, 5, 5, 5], 4),
    "ragged": ([7, 12, 3], [1, 6, 4, 6, 2, 2, 5, 1, 3], 3),
    "one_group": ([5], [4, 1], 2),
}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("case", list(CASES))
def test_shared_prompt_logps_and_grads_equal_whole_rows(case, tie):
    prompt_lens, completion_lens, group = CASES[case]
    model = _model(tie)
    batch = _batch(prompt_lens, completion_lens, group)
    assert shares_prompts(model, batch, group)
    weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]

    whole = token_logps(forward_logits(model, batch), batch.targets, 0.7)
    whole_grads = torch.autograd.grad((whole * weights).sum(), params)
    shared = shared_prompt_logps(model, batch, group, 0.7)
    shared_grads = torch.autograd.grad((shared * weights).sum(), params)

    assert shared.shape == whole.shape
    assert torch.equal(shared != 0, batch.targets != IGNORE)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    for mine, want in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-4)


def test_shared_prompt_under_bf16_autocast():
    prompt_lens, completion_lens, group = CASES["ragged"]
    model = _model(True)
    batch = _batch(prompt_lens, completion_lens, group)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        whole = token_logps(forward_logits(model, batch), batch.targets)
        shared = shared_prompt_logps(model, batch, group, 1.0)
    torch.testing.assert_close(shared, whole, atol=0.1, rtol=0.02)


def test_what_does_not_share_prompts():
    model = _model(True)
    batch = _batch([6, 6], [3, 3, 3, 3], 2)
    assert shares_prompts(model, batch, 2)
    assert not shares_prompts(model, batch, 3)  # rows are not whole groups
    assert not shares_prompts(model, batch.replace(prompt_lens=None), 2)  # a rollout without prompt lengths
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert not shares_prompts(model, batch, 2)

    from instar.kernels.fp8.linear import Float8Linear

    fp8 = _model(True)
    mlp = fp8.model.layers[0].mlp
    mlp.up_proj = Float8Linear.from_linear(torch.nn.Linear(48, 80, bias=False))
    assert not shares_prompts(fp8, batch, 2)
