"""Data that trains, but not as the user likely meant: notes printed once per stage (rank 0).

Both may be deliberate (a tiny smoke-test file, a symbol the tokenizer cannot spell), so they are
warnings with the counts, not errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator


def small_data_note(path: Path, rows: int, global_batch: int, layout: str) -> str | None:
    """A source with fewer rows than one optimizer step draws repeats each row within every step."""
    if rows >= global_batch:
        return None
    return (f"warning: {path}: {rows} row(s), fewer than one global batch of {global_batch} rows ({layout}): "
            f"every step trains on the same rows, each about {global_batch / rows:.1f} times")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def unknown_characters_note(path: Path, rows: list[dict], tokenizer) -> str | None:
    """Characters the tokenizer encodes as its unknown token (the instar-char tokenizer knows
    printable ASCII and "\\n" only): the model learns one <unk> for all of them."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return None
    seen: set[str] = set()
    for row in rows:
        for text in _strings(row):
            seen.update(text)
    chars = sorted(seen)
    encoded = tokenizer(chars, add_special_tokens=False)["input_ids"] if chars else []
    unknown = [ch for ch, ids in zip(chars, encoded) if unk in ids]
    if not unknown:
        return None
    pattern = re.compile("[" + re.escape("".join(unknown)) + "]")
    hits = [sum(len(pattern.findall(text)) for text in _strings(row)) for row in rows]
    shown = ", ".join(repr(ch) for ch in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
    return (f"warning: {path}: {sum(h > 0 for h in hits)} of {len(rows)} row(s) hold {sum(hits)} character(s) "
            f"the tokenizer maps to {tokenizer.unk_token} ({len(unknown)} distinct: {shown}); the model learns "
            f"them all as one token. Use a tokenizer that covers them, or clean the data")
