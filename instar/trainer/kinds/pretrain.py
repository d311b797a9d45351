"""`pretrain`: next-token prediction on `{"text"}` documents, packed without cross-document attention."""

from __future__ import annotations

from instar.kinds.pretrain import PretrainDefinition
from instar.trainer.kinds.base import TrainingKind


def text_examples(tokenizer, rows: list[dict]) -> list:
    """Each document as `[bos] + tokens + [eos]`, learning every next token. Token shards
    (`data.shards`) already hold documents in that form and are used as they are."""
    from instar.data.packing import causal_example
    from instar.data.shards import TokenShards

    if isinstance(rows, TokenShards):
        rows.check_tokenizer(tokenizer, "data.shards")
        return rows

    encoded = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None else []
    return [causal_example(prefix + ids + [eos]) for ids in encoded]


class PretrainKind(PretrainDefinition, TrainingKind):
    def build_sources(self, tokenizer, rows_per_source):
        return [text_examples(tokenizer, rows_per_source[0])], [1.0]
