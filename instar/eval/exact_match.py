"""Greedy exact-match accuracy on prompt/answer rows (the arithmetic world's held-out problems).

Generation is a short hand-written greedy loop rather than `model.generate`: `generate` fills every
option left unset with the values in the model's saved `generation_config` (repetition penalty,
suppressed tokens, ...), so it is not guaranteed to be the plain argmax of the model's logits.
Batches are left-padded; position ids are cumsum(attention_mask) - 1 so that a padded prompt sees
exactly the positions it would see alone, and a test holds batched == one-by-one.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instar.data.arithmetic import extract_answer
from instar.errors import ContractError, DataError

PROMPT_FORMATS = ("plain", "chat")
# Enough for a 4-digit sum + EOS (plain) and for worked steps of 4-digit operands + EOS (chat).
DEFAULT_MAX_NEW_TOKENS = {"plain": 8, "chat": 48}
SAMPLE_COUNT = 5


def _checked_rows(rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from rows; DataError naming the first malformed row."""
    if not rows:
        raise DataError(
            'exact_match: no rows to score; give a list of {"prompt", "answer"} rows (e.g. heldout.jsonl).'
        )
    pairs: list[tuple[str, str]] = []
    for index, row in enumerate(rows):
        prompt, answer = (row.get("prompt"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(
                f"exact_match: row {index} is {row!r}; each row must be an object with a string "
                "'prompt' (e.g. \"12+34\") and a string 'answer' (e.g. \"46\")."
            )
        pairs.append((prompt, answer))
    return pairs


def _required_token_id(tokenizer: PreTrainedTokenizerBase, name: str, prompt_format: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise ContractError(
            f"exact_match: prompt_format '{prompt_format}' needs a tokenizer with a {name} token; "
            f"this one has none (use the instar-char tokenizer or set tokenizer.{name}_token)."
        )
    return token_id


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_format: str) -> list[int]:
    """The prompt's token ids as the model saw such prompts in training.

    plain: [bos] + encode(prompt + "=") — pretraining documents are [bos] a+b=c [eos].
    chat:  the chat template of one user turn plus the generation prompt ("A: ").
    """
    if prompt_format == "plain":
        bos = _required_token_id(tokenizer, "bos", prompt_format)
        return [bos] + tokenizer.encode(prompt + "=", add_special_tokens=False)
    if not tokenizer.chat_template:
        raise ContractError(
            "exact_match: prompt_format 'chat' needs a tokenizer with a chat template; this one has "
            "none (use the instar-char tokenizer, or prompt_format 'plain')."
        )
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _stop_ids(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> list[int]:
    """EOS always; for plain prompts also "\\n" when it is a single token (a document ends there)."""
    stops = [_required_token_id(tokenizer, "eos", prompt_format)]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if prompt_format == "plain" and len(newline) == 1 and newline[0] != tokenizer.unk_token_id:
        stops.append(newline[0])
    return stops


def _left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest] int64, prompts aligned to the right."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _trim_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """ids up to, not including, the first stop id."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position]
    return ids


def _returned_cache(output: object) -> object:
    """The KV cache a forward call returned, under either of its transformers 5.x names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _greedy_batch(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of one batch of prompts, each cut before its first stop id."""
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded(prompts, pad_id, device)
    parameters = inspect.signature(model.forward).parameters
    # Only the last position's logits are needed; skipping the rest matters for large vocabularies.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40).
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    output = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra
    )
    next_position = position_ids[:, -1:] + 1
    stop_tensor = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        # Rows already stopped get filler; it is cut off by _trim_at_stop.
        token = output.logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
        steps.append(token)
        finished |= torch.isin(token, stop_tensor)
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=-1)
        output = model(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            **{cache_name: _returned_cache(output)},
            use_cache=True,
            **extra,
        )
        next_position = next_position + 1
    generated = torch.stack(steps, dim=1).tolist()
    return [_trim_at_stop(ids, stop_ids) for ids in generated]


def greedy_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int = 128,
) -> list[list[int]]:
    """Greedy (argmax) continuations of token-id prompts, in the prompts' order.

    Each continuation has at most max_new_tokens ids and ends before its first stop id (the stop id
    is not included). Prompts are batched by length to limit padding; left padding with
    position ids cumsum(mask) - 1 makes results independent of batch_size (up to float rounding).
    The caller sets eval mode and disables autograd.
    """
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _greedy_batch(model, [prompts[index] for index in chunk], max_new_tokens, stop_ids, pad_id)
        for index, continuation in zip(chunk, batch):
            results[index] = continuation
    return results


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(
            f"exact_match: unknown prompt_format '{prompt_format}'; use 'plain' (a+b= after pretraining) "
            "or 'chat' (the chat template, after SFT)."
        )


def _check_limits(batch_size: int, max_new_tokens: int) -> None:
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError(
            f"exact_match: batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}."
        )


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    prompt_format: str,
    batch_size: int = 128,
    max_new_tokens: int | None = None,
) -> dict:
    """Greedy exact-match accuracy of model on {"prompt", "answer"} rows.

    Returns {"accuracy": correct / n (float in [0, 1]), "n": int, "correct": int, "samples": the
    first 5 rows as {"prompt", "completion", "answer", "correct"}}. A completion is correct when
    `extract_answer(completion) == answer`. The model runs in eval mode without autograd; its
    training mode is restored afterwards.
    """
    pairs = _checked_rows(rows)
    _check_prompt_format(prompt_format)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS[prompt_format] if max_new_tokens is None else max_new_tokens
    _check_limits(batch_size, max_new_tokens)
    prompts = [encode_prompt(tokenizer, prompt, prompt_format) for prompt, _ in pairs]
    stop_ids = _stop_ids(tokenizer, prompt_format)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            generated = greedy_generate(model, prompts, max_new_tokens, stop_ids, pad_id, batch_size)
    finally:
        model.train(was_training)
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    verdicts = [extract_answer(completion) == answer for completion, (_, answer) in zip(completions, pairs)]
    correct = sum(verdicts)
    samples = [
        {"prompt": prompt, "completion": completion, "answer": answer, "correct": verdict}
        for (prompt, answer), completion, verdict in list(zip(pairs, completions, verdicts))[:SAMPLE_COUNT]
    ]
    return {"accuracy": correct / len(pairs), "n": len(pairs), "correct": correct, "samples": samples}
