"""`sft`: supervised fine-tuning on chat `messages`, rendered by the tokenizer's chat template.

Which tokens carry loss (`loss_on`): `assistant` (every assistant turn, default), `last_turn`
(only the final assistant turn) or `all`. The assistant tokens come from the template's
`{% generation %}` blocks, the same mechanism TRL uses, and include each turn's EOS.

A conversation longer than `train.seq_len` (`truncation`): `keep_start` cuts its end (TRL's
default), `keep_end` cuts its beginning so the final answer survives, `drop` skips it (counted)
and `error` stops with the row's number.
"""

from __future__ import annotations

from typing import Literal

from instar.config.schema import StageSpec
from instar.data.example import IGNORE, Example
from instar.errors import ContractError, DataError
from instar.trainer.kinds.base import TrainingKind


class SftSpec(StageSpec):
    loss_on: Literal["assistant", "last_turn", "all"] = "assistant"
    truncation: Literal["keep_start", "keep_end", "drop", "error"] = "keep_start"


def fit_length(examples: list[Example], seq_len: int, policy: str, stage: str) -> tuple[list[Example], int]:
    """Examples made to fit `seq_len` by `policy`, and how many were over-long."""
    out, over = [], 0
    for row, ex in enumerate(examples, start=1):
        if len(ex.input_ids) <= seq_len:
            out.append(ex)
            continue
        over += 1
        if policy == "error":
            raise DataError(f"stage '{stage}': conversation {row} is {len(ex.input_ids)} tokens, more than "
                            f"train.seq_len={seq_len}; raise seq_len or set stages.{stage}.truncation to "
                            f"keep_start, keep_end or drop")
        if policy == "keep_start":  # the last kept token has no next token to predict
            out.append(Example(ex.input_ids[:seq_len], ex.targets[:seq_len - 1] + [IGNORE]))
        elif policy == "keep_end":
            out.append(Example(ex.input_ids[-seq_len:], ex.targets[-seq_len:]))
    return out, over


def _last_run(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones in `mask`."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def chat_examples(tokenizer, rows: list[dict], loss_on: str) -> list:
    from instar.data.packing import causal_example

    examples = []
    for row in rows:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        if loss_on == "assistant" and not any(mask):
            raise ContractError("the chat template marks no assistant tokens: it needs "
                                "{% generation %}...{% endgeneration %} around assistant content")
        if loss_on == "last_turn":
            mask = _last_run(mask)
        elif loss_on == "all":
            mask = [1] * len(ids)
        examples.append(causal_example(ids, [bool(m) for m in mask]))
    return examples


class SftKind(TrainingKind):
    name = "sft"
    Spec = SftSpec
    row_format = "messages"
    needs_chat_template = True

    def build_sources(self, tokenizer, rows_per_source):
        spec = self.ctx.spec
        examples = chat_examples(tokenizer, rows_per_source[0], spec.loss_on)
        examples, over = fit_length(examples, spec.train.seq_len, spec.truncation, self.ctx.name)
        if over and self.ctx.rank == 0:
            from instar.console import say

            how = "dropped" if spec.truncation == "drop" else f"cut ({spec.truncation})"
            say(f"[{self.ctx.name}] {over} conversations longer than seq_len={spec.train.seq_len} were {how}",
                self.ctx.quiet)
        if not examples:
            raise DataError(f"stage '{self.ctx.name}': every conversation is longer than train.seq_len="
                            f"{spec.train.seq_len}; raise it")
        return [examples], [1.0]
