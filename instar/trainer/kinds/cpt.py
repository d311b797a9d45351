"""`cpt`: continued pretraining from a parent on new text, replaying a share of the parent's data.

`replay: 0.25` draws a quarter of the documents from the parent stage's own training data,
which keeps the parent's skills from being forgotten while the new domain is learnt.
"""

from __future__ import annotations

from pydantic import Field

from instar.config.schema import DataSpec, Recipe, StageSpec
from instar.trainer.kinds.base import TrainingKind
from instar.trainer.kinds.pretrain import text_examples


class CptSpec(StageSpec):
    replay: float = Field(default=0.0, ge=0.0, lt=1.0)


class CptKind(TrainingKind):
    name = "cpt"
    Spec = CptSpec
    min_parents = 1
    row_format = "text"

    @classmethod
    def data_specs(cls, name: str, spec: CptSpec, recipe: Recipe) -> list[DataSpec]:
        specs = super().data_specs(name, spec, recipe)
        if spec.replay > 0 and spec.after and spec.after[0] in recipe.stages:
            parent_data = recipe.stages[spec.after[0]].data
            if parent_data is not None:
                specs.append(parent_data)
        return specs

    @classmethod
    def check(cls, name: str, spec: CptSpec, recipe: Recipe) -> list[str]:
        problems = super().check(name, spec, recipe)
        if spec.replay > 0 and spec.after and spec.after[0] in recipe.stages:
            from instar.trainer.kinds import get_kind

            parent = recipe.stages[spec.after[0]]
            if parent.data is None or get_kind(parent.kind).row_format != "text":
                problems.append(f"stages.{name}.replay: parent '{spec.after[0]}' ({parent.kind}) has no text "
                                f"data to replay; set replay: 0 or put the cpt stage after a pretrain/cpt stage")
        return problems

    def build_sources(self, tokenizer, rows_per_source):
        replay = self.ctx.spec.replay
        sources = [text_examples(tokenizer, rows) for rows in rows_per_source]
        weights = [1.0 - replay, replay] if len(sources) == 2 else [1.0]
        return sources, weights
