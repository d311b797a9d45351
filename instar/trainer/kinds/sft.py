"""`sft`: supervised fine-tuning on chat `messages`, rendered by the tokenizer's chat template.

Which tokens carry loss (`loss_on`): `assistant` (every assistant turn, default), `last_turn`
(only the final assistant turn) or `all`. The assistant tokens come from the template's
`{% generation %}` blocks, the same mechanism TRL uses, and include each turn's EOS.
"""

from __future__ import annotations

from typing import Literal

from instar.config.schema import StageSpec
from instar.errors import ContractError
from instar.trainer.kinds.base import TrainingKind


class SftSpec(StageSpec):
    loss_on: Literal["assistant", "last_turn", "all"] = "assistant"


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
        return [chat_examples(tokenizer, rows_per_source[0], self.ctx.spec.loss_on)], [1.0]
