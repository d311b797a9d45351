"""`cpt`: continued pretraining from a parent on new text, replaying a share of the parent's data.

`replay: 0.25` draws a quarter of the documents from the parent stage's own training data,
which keeps the parent's skills from being forgotten while the new domain is learnt.
"""

from __future__ import annotations

from instar.kinds.cpt import CptDefinition
from instar.trainer.kinds.base import TrainingKind
from instar.trainer.kinds.pretrain import text_examples


class CptKind(CptDefinition, TrainingKind):
    def build_sources(self, tokenizer, rows_per_source):
        replay = self.ctx.spec.replay
        sources = [text_examples(tokenizer, rows) for rows in rows_per_source]
        weights = [1.0 - replay, replay] if len(sources) == 2 else [1.0]
        return sources, weights
