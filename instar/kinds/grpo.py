"""`grpo`: reinforcement learning from rewards on `{"prompt", "answer"}` rows (see instar.trainer.kinds.grpo)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from instar.config.schema import Recipe, StageSpec, Strict
from instar.kinds.base import KindDefinition, check_reference, setting_path
from instar.methods.rl import ADVANTAGE_SCALES, LOSS_TYPES


class RewardSpec(Strict):
    fn: str = "exact"  # a built-in (exact, format, reft) or `module:function`
    weight: float = 1.0


class GrpoSpec(StageSpec):
    group_size: int = Field(default=8, ge=2)
    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.0, ge=0)  # k3 KL coefficient; 0 = no reference model
    clip_eps: float = Field(default=0.2, gt=0, lt=1)
    clip_eps_high: float | None = Field(default=None, gt=0)  # DAPO's clip-higher; default = clip_eps
    epochs: int = Field(default=1, ge=1)  # optimizer steps per rollout
    scale_rewards: str = "group"  # a registered advantage scaling (instar.methods.rl); none = Dr.GRPO
    loss_type: str = "grpo"  # a registered loss type (instar.methods.rl)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec()], min_length=1)
    reference: str | None = None  # an ancestor stage; default: the first parent

    @field_validator("scale_rewards")
    @classmethod
    def _known_scale(cls, name: str) -> str:
        return ADVANTAGE_SCALES.validate(name)

    @field_validator("loss_type")
    @classmethod
    def _known_loss_type(cls, name: str) -> str:
        return LOSS_TYPES.validate(name)

    @model_validator(mode="after")
    def _dr_grpo(self) -> "GrpoSpec":
        if self.loss_type == "dr_grpo" and self.scale_rewards != "none":
            raise ValueError("loss_type dr_grpo leaves advantages unscaled: set scale_rewards: none")
        return self


class GrpoDefinition(KindDefinition):
    name = "grpo"
    Spec = GrpoSpec
    min_parents = 1
    row_format = "prompt_answer"
    needs_chat_template = True
    causal_lm_loss = False
    packs_rows = False  # a row is one prompt; its completions are laid out by the kind
    uses_reference = True  # when beta > 0

    @classmethod
    def check(cls, name: str, spec: GrpoSpec, recipe: Recipe) -> list[str]:
        from instar.methods.rewards import check_reward_name

        problems = super().check(name, spec, recipe) + check_reference(name, spec.reference, recipe)
        for i, reward in enumerate(spec.rewards):
            problem = check_reward_name(reward.fn)
            if problem:
                problems.append(f"stages.{name}.rewards[{i}].fn: {problem}")
        if spec.reference is not None and spec.beta == 0:
            problems.append(f"stages.{name}.reference: beta is 0, so no reference is used; set beta > 0 "
                            f"for a KL penalty or drop `reference`")
        if spec.train.seq_len <= spec.max_new_tokens:
            problems.append(f"{setting_path(recipe, name, 'train', 'seq_len')} ({spec.train.seq_len}) must exceed "
                            f"stages.{name}.max_new_tokens ({spec.max_new_tokens}) to leave room for the prompt")
        return problems
