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

    @model_validator(mode="after")
    def _assistant_says_something(self) -> "Message":
        if self.role == "assistant" and not self.content.strip():
            raise ValueError("an assistant turn with empty content: give it the reply to learn, or drop the turn")
        return self


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


class UnpairedPreferenceRow(_Row):
    """Unpaired feedback (KTO): `{"prompt": ..., "completion": "46", "label": true}` — a completion
    that is desirable (true) or not. A preference pair `{"prompt", "chosen", "rejected"}` is also
    accepted and counts as two rows (chosen desirable, rejected not), as TRL unpairs it."""

    prompt: str | list[Message]
    completion: str | None = None
    label: bool | None = None
    chosen: str | None = None
    rejected: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "UnpairedPreferenceRow":
        unpaired = self.completion is not None or self.label is not None
        paired = self.chosen is not None or self.rejected is not None
        if unpaired == paired or (unpaired and (self.completion is None or self.label is None)) or (
                paired and (self.chosen is None or self.rejected is None)):
            raise ValueError("give `completion` and `label` (unpaired feedback), or `chosen` and `rejected` "
                             "(a pair), not a mix")
        for text in (self.completion, self.chosen, self.rejected):
            if text is not None and not text.strip():
                raise ValueError("empty completion")
        if isinstance(self.prompt, list) and (not self.prompt or self.prompt[-1].role != "user"):
            raise ValueError("a conversational prompt must end with a user turn")
        return self


ROW_FORMATS: dict[str, type[_Row]] = {
    "text": TextRow,
    "messages": ChatRow,
    "prompt_answer": PromptAnswerRow,
    "preference": PreferenceRow,
    "unpaired_preference": UnpairedPreferenceRow,
}
