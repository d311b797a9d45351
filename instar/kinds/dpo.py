"""`dpo`: preference optimisation on `{"prompt", "chosen", "rejected"}` rows (see instar.trainer.kinds.dpo)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from instar.config.schema import Recipe, StageSpec, Strict
from instar.kinds.base import KindDefinition, check_reference
from instar.methods.preference import PREFERENCE_LOSSES


class OnPolicyNegatives(Strict):
    """Replace each row's `rejected` by a wrong answer sampled from the stage's starting model."""

    samples: int = Field(default=4, ge=1)  # completions drawn per prompt
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)
    only_mistakes: bool = False  # drop rows the model always got right (else keep the data's rejected)


class DpoSpec(StageSpec):
    loss: str = "sigmoid"  # a registered preference loss (instar.methods.preference)
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    alpha: float = Field(default=0.8, ge=0)  # REDI: weight of the rejected term
    nll_coef: float = Field(default=0.0, ge=0)
    reference: str | None = None  # an ancestor stage; default: the first parent
    reference_logps: Literal["cached", "on_the_fly"] = "cached"
    negatives: OnPolicyNegatives | None = None  # on-policy rejected answers

    @field_validator("loss")
    @classmethod
    def _registered(cls, name: str) -> str:
        return PREFERENCE_LOSSES.validate(name)

    @property
    def reference_free(self) -> bool:
        return PREFERENCE_LOSSES[self.loss].reference_free


class DpoDefinition(KindDefinition):
    name = "dpo"
    Spec = DpoSpec
    min_parents = 1
    row_format = "preference"
    needs_chat_template = True
    causal_lm_loss = False
    uses_reference = True

    @classmethod
    def check(cls, name: str, spec: DpoSpec, recipe: Recipe) -> list[str]:
        problems = super().check(name, spec, recipe) + check_reference(name, spec.reference, recipe)
        if spec.reference_free and spec.reference is not None:
            problems.append(f"stages.{name}.reference: loss `{spec.loss}` is reference-free; drop `reference`")
        return problems
