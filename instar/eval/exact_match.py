"""Greedy exact-match accuracy on prompt/answer rows (the arithmetic world's held-out problems).

Decoding is instar.eval.generate's hand-written greedy loop (not `model.generate`, whose saved
generation_config may change what "greedy" means).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instar.data.arithmetic import extract_answer
from instar.errors import ContractError, DataError
from instar.eval.generate import decode, greedy_pick

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
    is not included). Results are independent of batch_size (up to float rounding).
    The caller sets eval mode and disables autograd.
    """
    generated = decode(model, prompts, max_new_tokens, stop_ids, pad_id, batch_size, greedy_pick)
    return [ids[:-1] if ids and ids[-1] in stop_ids else ids for ids in generated]


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
