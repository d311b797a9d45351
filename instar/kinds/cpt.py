"""`cpt`: continued pretraining from a parent on new text; `replay: r` draws a share r of the
documents from the parent stage's own data."""

from __future__ import annotations

from pydantic import Field

from instar.config.schema import DataSpec, Recipe, StageSpec
from instar.kinds.base import KindDefinition


class CptSpec(StageSpec):
    replay: float = Field(default=0.0, ge=0.0, lt=1.0)


class CptDefinition(KindDefinition):
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
            from instar.kinds import definition

            parent = recipe.stages[spec.after[0]]
            if parent.data is None or definition(parent.kind).row_format != "text":
                problems.append(f"stages.{name}.replay: parent '{spec.after[0]}' ({parent.kind}) has no text "
                                f"data to replay; set replay: 0 or put the cpt stage after a pretrain/cpt stage")
        return problems
