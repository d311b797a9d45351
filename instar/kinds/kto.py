"""`kto`: Kahneman-Tversky optimisation on unpaired feedback (see instar.trainer.kinds.kto)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from instar.config.schema import Recipe, StageSpec
from instar.kinds.base import KindDefinition, check_reference
from instar.methods.kto import KTO_LOSSES


class KtoSpec(StageSpec):
    loss: str = "kto"  # a registered KTO loss (instar.methods.kto)
    beta: float = Field(default=0.1, gt=0)
    desirable_weight: float = Field(default=1.0, gt=0)  # λ_D
    undesirable_weight: float = Field(default=1.0, gt=0)  # λ_U
    reference: str | None = None  # an ancestor stage; default: the first parent
    reference_logps: Literal["cached", "on_the_fly"] = "cached"

    @field_validator("loss")
    @classmethod
    def _registered(cls, name: str) -> str:
        return KTO_LOSSES.validate(name)


class KtoDefinition(KindDefinition):
    name = "kto"
    Spec = KtoSpec
    min_parents = 1
    row_format = "unpaired_preference"
    needs_chat_template = True
    causal_lm_loss = False
    uses_reference = True

    @classmethod
    def check(cls, name: str, spec: KtoSpec, recipe: Recipe) -> list[str]:
        return super().check(name, spec, recipe) + check_reference(name, spec.reference, recipe)
