"""The arithmetic world: seeded addition problems for every stage, with a fixed held-out set.

A problem is a pair (a, b) of non-negative integers asking for a+b. The held-out set is fixed by a
rule (not by a seed), so every run and every stage is scored on the same ~500 problems, and no
training split can ever contain one of them.

Splits and row formats (one JSON object per row):
  pretrain   {"text": "12+34=46"}                  operands in [0, 99]
  cpt        {"text": "512+34=546"}                operands in [0, 999], at least one >= 100
  sft        {"messages": [user "12+34", assistant "46"]}
  sft_steps  {"messages": [user "47+85", assistant worked_steps(47, 85)]}
  dpo        {"prompt": "12+34", "chosen": "46", "rejected": "48"}  a near miss: one digit changed
  prompts    {"prompt": "12+34", "answer": "46"}   training prompts with answers (GRPO)
  heldout    {"prompt": "12+34", "answer": "46"}   every held-out problem, sorted
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from instar.data.jsonl import write_rows
from instar.errors import DataError

SPLITS = ("pretrain", "cpt", "sft", "sft_steps", "dpo", "prompts", "heldout")
DEFAULT_SIZES = {"pretrain": 20000, "cpt": 20000, "sft": 5000, "sft_steps": 5000, "dpo": 5000, "prompts": 5000,
                 "heldout": 0}

HELDOUT_MAX_OPERAND = 99  # the held-out rule only covers operands 0..99
SHORT_MAX_OPERAND = 99  # default range of pretrain, sft and sft_steps
LONG_MIN_OPERAND = 100  # cpt: at least one operand this large
LONG_MAX_OPERAND = 999  # default range of cpt

_INTEGER = re.compile(r"-?\d+")


def is_heldout(a: int, b: int) -> bool:
    """True iff a+b is in the fixed held-out set: both operands in [0, 99] and a well-mixed hash of
    the unordered pair {a, b} falls in one of 20 buckets (~5 %, about 500 problems). The set is
    closed under a+b -> b+a. A hash, not a linear congruence: (a*7919 + b*104729) % 20 == 0 picked
    only sums ending in 0 (every hard carry case), which made the held-out set unlike the rest."""
    if not (0 <= a <= HELDOUT_MAX_OPERAND and 0 <= b <= HELDOUT_MAX_OPERAND):
        return False
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"heldout:{lo}+{hi}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 20 == 0


def heldout_problems() -> list[tuple[int, int]]:
    """All held-out (a, b) pairs, sorted by a then b."""
    span = range(HELDOUT_MAX_OPERAND + 1)
    return [(a, b) for a in span for b in span if is_heldout(a, b)]


def _excluded_from_training(a: int, b: int) -> bool:
    # Commuted forms are checked too, so a model cannot be credited for a memorised b+a. (The rule
    # happens to be symmetric already; this keeps it honest should the rule ever change.)
    return is_heldout(a, b) or is_heldout(b, a)


def worked_steps(a: int, b: int) -> str:
    """The worked column addition of a+b, right to left, ending with the answer.

    One `|`-separated segment per column, from the units column up: `x+y+c=s`, where x and y are
    that column's digits of a and b (0 past the end of the shorter operand), c is the carry into
    the column (always written, 0 or 1) and s = x+y+c in decimal; the carry out is s // 10 and is
    the next column's c. The last segment is `=` followed by a+b. Example:
    47+85 -> `7+5+0=12|4+8+1=13|=132`; 5+123 -> `5+3+0=8|0+2+0=2|0+1+0=1|=128`.
    """
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    segments: list[str] = []
    carry = 0
    for column in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[column]) if column < len(digits_a) else 0
        y = int(digits_b[column]) if column < len(digits_b) else 0
        total = x + y + carry
        segments.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    segments.append(f"={a + b}")
    return "|".join(segments)


def extract_answer(text: str) -> str:
    """The final answer in a completion, or "" when it holds none.

    The completion is stripped and cut at its first newline (what follows is a new turn); if it
    contains `|` (worked steps) only the part after the last `|` is kept, minus a leading `=`.
    What remains must be a bare integer (digits, optionally a leading `-`), else "" — so a
    completion cut off in the middle of its worked steps never counts as an answer.
    """
    line = text.strip().split("\n", 1)[0]
    if "|" in line:
        line = line.rsplit("|", 1)[1].strip()
        line = line[1:] if line.startswith("=") else line
    line = line.strip()
    return line if _INTEGER.fullmatch(line) else ""


def _split_rng(split: str, seed: int) -> random.Random:
    # A private generator per (split, seed): no global state, and pretrain and sft drawn with the
    # same seed are different problem streams rather than the same pairs in two formats.
    return random.Random(f"instar.arithmetic/{split}/{seed}")


def _check_short_range(max_operand: int) -> None:
    """Raise DataError unless [0, max_operand] holds at least one problem allowed in training."""
    if max_operand < 0:
        raise DataError(f"arithmetic: max_operand must be >= 0, got {max_operand}.")
    span = range(min(max_operand, HELDOUT_MAX_OPERAND) + 1)
    if not any(not _excluded_from_training(a, b) for a in span for b in span):
        raise DataError(
            f"arithmetic: max_operand={max_operand} leaves no training problem (every problem in "
            "range is held out); use max_operand >= 1."
        )


def _sample_short_pair(rng: random.Random, max_operand: int) -> tuple[int, int]:
    """A uniform draw (with replacement) from the training problems with operands in [0, max_operand]."""
    while True:  # rejection keeps the draw uniform over the allowed pairs; >= 90 % are accepted
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if not _excluded_from_training(a, b):
            return a, b


def _sample_long_pair(rng: random.Random, max_operand: int) -> tuple[int, int]:
    """A uniform draw from the pairs in [0, max_operand]^2 with at least one operand >= 100."""
    while True:  # such pairs are never held out: the rule covers operands <= 99 only
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if max(a, b) >= LONG_MIN_OPERAND:
            return a, b


def _text_row(a: int, b: int) -> dict:
    return {"text": f"{a}+{b}={a + b}"}


def _chat_row(a: int, b: int, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": answer}]}


def _prompt_row(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}", "answer": str(a + b)}


def _short_pairs(split: str, rows: int, seed: int, max_operand: int | None) -> list[tuple[int, int]]:
    limit = SHORT_MAX_OPERAND if max_operand is None else max_operand
    _check_short_range(limit)
    rng = _split_rng(split, seed)
    return [_sample_short_pair(rng, limit) for _ in range(rows)]


def _long_pairs(rows: int, seed: int, max_operand: int | None) -> list[tuple[int, int]]:
    limit = LONG_MAX_OPERAND if max_operand is None else max_operand
    if limit < LONG_MIN_OPERAND:
        raise DataError(
            f"arithmetic: split 'cpt' needs max_operand >= {LONG_MIN_OPERAND} (it only holds "
            f"problems with an operand >= {LONG_MIN_OPERAND}), got {limit}."
        )
    rng = _split_rng("cpt", seed)
    return [_sample_long_pair(rng, limit) for _ in range(rows)]


def generate_rows(split: str, rows: int, seed: int, max_operand: int | None = None) -> list[dict]:
    """`rows` rows of `split` (see the module docstring for formats), deterministic in all arguments.

    Training splits never contain a held-out problem or its commuted form. `heldout` ignores seed
    and max_operand and gives every held-out problem sorted by (a, b), or the first `rows` of them
    when rows > 0. Raises DataError for an unknown split, a negative row count or an operand
    range that cannot hold the split.
    """
    if split not in SPLITS:
        raise DataError(f"arithmetic: unknown split '{split}'; valid splits are {', '.join(SPLITS)}.")
    if split == "heldout":
        problems = heldout_problems()
        return [_prompt_row(a, b) for a, b in (problems[:rows] if rows > 0 else problems)]
    if rows < 0:
        raise DataError(f"arithmetic: split '{split}' needs rows >= 0, got {rows}.")
    if split == "cpt":
        return [_text_row(a, b) for a, b in _long_pairs(rows, seed, max_operand)]
    pairs = _short_pairs(split, rows, seed, max_operand)
    if split == "pretrain":
        return [_text_row(a, b) for a, b in pairs]
    if split == "sft":
        return [_chat_row(a, b, str(a + b)) for a, b in pairs]
    if split == "dpo":
        return _dpo_rows(pairs, seed)
    if split == "prompts":
        return [_prompt_row(a, b) for a, b in pairs]
    return [_chat_row(a, b, worked_steps(a, b)) for a, b in pairs]


def near_miss(answer: str, rng: random.Random) -> str:
    """`answer` with one digit replaced by another (never a leading zero): the hardest wrong answer."""
    pos = rng.randrange(len(answer))
    choices = [d for d in "0123456789" if d != answer[pos] and not (pos == 0 and d == "0" and len(answer) > 1)]
    return answer[:pos] + rng.choice(choices) + answer[pos + 1:]


def _dpo_rows(pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    rng = _split_rng("dpo/rejected", seed)
    return [{"prompt": f"{a}+{b}", "chosen": str(a + b), "rejected": near_miss(str(a + b), rng)} for a, b in pairs]


def _merged_sizes(sizes: dict[str, int] | None) -> dict[str, int]:
    """DEFAULT_SIZES overridden by `sizes`; DataError for a split name that does not exist."""
    unknown = sorted(set(sizes or {}) - set(SPLITS))
    if unknown:
        raise DataError(
            f"arithmetic: unknown split(s) {', '.join(unknown)} in sizes; valid splits are {', '.join(SPLITS)}."
        )
    return {**DEFAULT_SIZES, **(sizes or {})}


def write_arithmetic(out_dir: Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `<split>.jsonl` for every split into out_dir and return split -> path.

    Row counts are DEFAULT_SIZES overridden by `sizes` (heldout <= 0 means all 500 problems).
    Each file is replaced atomically, so a crash leaves either the old file or the new one.
    """
    counts = _merged_sizes(sizes)
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for split in SPLITS:
        paths[split] = out_dir / f"{split}.jsonl"
        write_rows(paths[split], generate_rows(split, counts[split], seed))
    return paths
