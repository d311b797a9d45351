"""`merge`: combine two or more parents in weight space (see instar.trainer.kinds.merge)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from instar.config.ancestry import ancestors
from instar.config.schema import Recipe, StageSpec
from instar.kinds.base import KindDefinition


class MergeSpec(StageSpec):
    method: Literal["average", "task_arithmetic"] = "average"
    weights: list[float] | None = None
    scale: float = Field(default=1.0, gt=0)
    base: str | None = None


def common_base(recipe: Recipe, parents: list[str]) -> str | None:
    """The nearest stage every parent descends from (the latest in topological order), or None."""
    shared = set.intersection(*(ancestors(recipe.stages, p) | {p} for p in parents))
    if not shared:
        return None
    # The nearest shared ancestor is the one with the most ancestors of its own.
    return max(shared, key=lambda s: (len(ancestors(recipe.stages, s)), list(recipe.stages).index(s)))


class MergeDefinition(KindDefinition):
    name = "merge"
    Spec = MergeSpec
    min_parents = 2
    max_parents = None
    row_format = None

    @classmethod
    def check(cls, name: str, spec: MergeSpec, recipe: Recipe) -> list[str]:
        problems = []
        parents = [p for p in spec.after if p in recipe.stages]
        if spec.data is not None:
            problems.append(f"stages.{name}.data: a merge stage reads no data; remove `data`")
        if spec.weights is not None and len(spec.weights) != len(spec.after):
            problems.append(f"stages.{name}.weights: {len(spec.weights)} weights for {len(spec.after)} parents")
        if spec.weights is not None and abs(sum(spec.weights)) < 1e-9:  # the average divides by their sum
            problems.append(f"stages.{name}.weights: {spec.weights} sum to 0, and the average divides by "
                            f"their sum; give weights with a positive sum, e.g. [0.5, 0.5]")
        if spec.weights is not None and spec.method != "average":
            problems.append(f"stages.{name}.weights: only used by method: average (use `scale` for task_arithmetic)")
        if len(parents) >= 2:
            if spec.base is not None:
                if spec.base not in recipe.stages:
                    problems.append(f"stages.{name}.base: '{spec.base}' is not a stage of this recipe")
                else:
                    outside = [p for p in parents if spec.base not in ancestors(recipe.stages, p)]
                    if outside:
                        problems.append(f"stages.{name}.base: '{spec.base}' is not an ancestor of "
                                        f"{', '.join(outside)}; the base must be a stage every parent descends from")
            elif common_base(recipe, parents) is None:
                problems.append(f"stages.{name}: parents {', '.join(parents)} share no base stage (no common "
                                f"ancestor), so their weights do not line up; merge models fine-tuned from one stage")
        return problems
