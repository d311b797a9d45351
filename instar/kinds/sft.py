"""`sft`: supervised fine-tuning on chat `messages` (see instar.trainer.kinds.sft)."""

from __future__ import annotations

from typing import Literal

from pydantic import SerializeAsAny, field_validator

from instar.config.schema import StageSpec
from instar.kinds.base import KindDefinition
from instar.methods.input_transforms import TransformSpec, parse_transforms


class SftSpec(StageSpec):
    loss_on: Literal["assistant", "last_turn", "all"] = "assistant"
    truncation: Literal["keep_start", "keep_end", "drop", "error"] = "keep_start"
    transforms: list[SerializeAsAny[TransformSpec]] = []  # input transforms (instar.methods.input_transforms)

    @field_validator("transforms", mode="before")
    @classmethod
    def _registered(cls, items):
        return parse_transforms(items)


class SftDefinition(KindDefinition):
    name = "sft"
    Spec = SftSpec
    row_format = "messages"
    needs_chat_template = True
