"""Preference pairs whose rejected answer is the policy's own mistake (on-policy negatives).

For each row, the stage's starting model samples a few completions of the prompt; the first one
that differs from `chosen` becomes `rejected`. Those are the errors the model actually makes,
which a fixed near-miss negative only guesses at. Rows the model always answers right keep the
data's own `rejected`, or are dropped (`only_mistakes`) so training looks only at the errors.
Sampling is seeded per row (its place in the dataset), so the pairs are the same however the rows
are split over ranks, and on every re-run.
"""

from __future__ import annotations

import zlib

import torch


def _prompt_ids(tokenizer, prompt) -> list[int]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def policy_negatives(model, tokenizer, rows: list[dict], cfg, seed: int, first: int = 0,
                     batch_size: int = 256) -> tuple[list[dict], int]:
    """(rows with on-policy `rejected` answers, how many rows got one); `first` is the dataset
    index of rows[0]."""
    from instar.eval.generate import decode_batch, sampling_pick

    k = cfg.samples
    out, replaced = [], 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [_prompt_ids(tokenizer, r["prompt"]) for r in chunk for _ in range(k)]
        generators = [torch.Generator().manual_seed(zlib.crc32(f"{seed}:{first + start + i // k}:{i % k}".encode()))
                      for i in range(len(prompts))]
        with torch.inference_mode():
            ids = decode_batch(model, prompts, cfg.max_new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                               sampling_pick(cfg.temperature, 1.0, generators))
        texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        for j, row in enumerate(chunk):
            wrong = next((t for t in texts[j * k:(j + 1) * k] if t and t != row["chosen"].strip()), None)
            if wrong is not None:
                out.append({**row, "rejected": wrong})
                replaced += 1
            elif not cfg.only_mistakes:
                out.append(row)
    return out, replaced


def split_policy_negatives(model, tokenizer, rows: list[dict], cfg, seed: int, rank: int,
                           world: int) -> tuple[list[dict], int]:
    """`policy_negatives` of every row, each rank sampling its contiguous slice; the results are
    gathered in dataset order on every rank."""
    from instar.trainer.split_work import gather_objects, rank_slice

    start, size = rank_slice(len(rows), rank, world)
    parts = gather_objects(policy_negatives(model, tokenizer, rows[start:start + size], cfg, seed, first=start),
                           world)
    return [row for part, _ in parts for row in part], sum(n for _, n in parts)
