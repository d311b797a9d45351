"""Row schemas of the JSONL formats each stage kind reads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class _Row(BaseModel):
    # Extra keys are allowed in data rows (ids, sources, scores): users' files carry them.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextRow(_Row):
    """Pretraining / CPT text: `{"text": "..."}`."""

    text: str

    @field_validator("text")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("`text` is empty")
        return value


class Message(_Row):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(_Row):
    """SFT conversation: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`."""

    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, value: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in value):
            raise ValueError("`messages` has no assistant turn to learn from")
        return value


class PreferenceRow(_Row):
    """A preference pair: `{"prompt": "12+34" or [messages], "chosen": "46", "rejected": "47"}`.
    The prompt is a user turn (a string) or a conversation ending with a user turn."""

    prompt: str | list[Message]
    chosen: str
    rejected: str

    @field_validator("chosen", "rejected")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty completion")
        return value

    @model_validator(mode="after")
    def _differ(self) -> "PreferenceRow":
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical: the pair teaches nothing")
        if isinstance(self.prompt, list) and (not self.prompt or self.prompt[-1].role != "user"):
            raise ValueError("a conversational prompt must end with a user turn")
        return self


class PromptAnswerRow(_Row):
    """A question with its reference answer: `{"prompt": "12+34", "answer": "46"}` (eval, GRPO)."""

    prompt: str
    answer: str


ROW_FORMATS: dict[str, type[_Row]] = {
    "text": TextRow,
    "messages": ChatRow,
    "prompt_answer": PromptAnswerRow,
    "preference": PreferenceRow,
}
