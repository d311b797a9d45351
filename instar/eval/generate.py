"""Batched decoding with a KV cache: greedy (eval) and sampled (GRPO rollouts).

A short hand-written loop rather than `model.generate`: `generate` fills every option left unset
with the values in the model's saved `generation_config` (repetition penalty, suppressed tokens,
...), so it is not guaranteed to draw from the model's own distribution. Batches are
left-padded; position ids are cumsum(attention_mask) − 1 so that a padded prompt sees exactly
the positions it would see alone (a test holds batched == one-by-one for greedy decoding).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from transformers import PreTrainedModel

# Picks the next token of every row from the last position's logits [rows, vocab].
Pick = Callable[[torch.Tensor], torch.Tensor]


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def sampling_pick(temperature: float, top_p: float, generators: list[torch.Generator]) -> Pick:
    """Draw row r from softmax(logits / temperature) with its own generator `generators[r]`,
    restricted to the smallest set of tokens whose probability reaches top_p (nucleus sampling;
    the most likely token is always kept).

    One uniform number per row and token, mapped through the row's inverse CDF: a row's sample
    does not depend on which other rows share its batch (or rank), so an RL rollout is the same
    on one process and on many."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        if top_p < 1.0:
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
            sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        cdf = sorted_probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf.device)
        rank = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        return order.gather(-1, rank)[:, 0]

    return pick


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest] int64, prompts aligned to the right."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_after_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """ids up to and including the first stop id."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position + 1]
    return ids


def _returned_cache(output: object) -> object:
    """The KV cache a forward call returned, under either of its transformers 5.x names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def decode_batch(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                 pad_id: int, pick: Pick = greedy_pick) -> list[list[int]]:
    """Continuations of one batch of prompts, each ending with its first stop id (kept) or after
    max_new_tokens ids. The caller sets eval mode and disables autograd.

    Llama models take the lean decoder of `fast_decode` (same arithmetic, a fraction of the
    overhead); anything it does not reproduce exactly takes HF's forward."""
    from instar.eval.fast_decode import llama_decoder

    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(prompts, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lean = llama_decoder(model, max_new_tokens)
    if lean is not None:
        logits = lean.prefill(input_ids, attention_mask, position_ids)
        advance = lean.step
    else:
        logits, advance = _hf_decoder(model, input_ids, attention_mask, position_ids)
    stop_tensor = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        # Rows already stopped get filler; it is cut off by cut_after_stop.
        token = pick(logits).masked_fill(finished, pad_id)
        steps.append(token)
        finished |= torch.isin(token, stop_tensor)
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        logits = advance(token)
    generated = torch.stack(steps, dim=1).tolist()
    return [cut_after_stop(ids, stop_ids) for ids in generated]


def _hf_decoder(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Decoding through the model's own forward and DynamicCache: (the prompt's last logits
    [batch, vocab], a function from the next tokens [batch] to the logits after them)."""
    parameters = inspect.signature(model.forward).parameters
    # Only the last position's logits are needed; skipping the rest matters for large vocabularies.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40).
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   **extra)
    state = {"output": output, "mask": attention_mask, "position": position_ids[:, -1:] + 1}

    def advance(token: torch.Tensor) -> torch.Tensor:
        mask = state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((len(token), 1))], dim=-1)
        output = state["output"] = model(input_ids=token[:, None], attention_mask=mask, position_ids=state["position"],
                                         **{cache_name: _returned_cache(state["output"])}, use_cache=True, **extra)
        state["position"] = state["position"] + 1
        return output.logits[:, -1]

    return output.logits[:, -1], advance


def decode(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
           batch_size: int = 128, pick: Pick = greedy_pick) -> list[list[int]]:
    """Continuations of token-id prompts in the prompts' order, batched by prompt length to limit
    padding. Each ends with its first stop id (kept) or has max_new_tokens ids."""
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = decode_batch(model, [prompts[index] for index in chunk], max_new_tokens, stop_ids, pad_id, pick)
        for index, continuation in zip(chunk, batch):
            results[index] = continuation
    return results
