"""Conversations as training examples, through the tokenizer's own chat template.

`loss_on` picks the tokens that carry loss: `assistant` (every assistant turn), `last_turn` (the
final assistant turn only) or `all`. The assistant tokens come from the template's
`{% generation %}` blocks, the mechanism TRL uses, and include each turn's EOS. Shared by the
kinds that learn from chat (sft, and dpo / kto for their completions).
"""

from __future__ import annotations

from instar.data.example import causal_example
from instar.errors import ContractError


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
