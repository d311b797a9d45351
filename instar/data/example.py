"""Tokenised training examples (no torch here: stage kinds import this while planning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

IGNORE = -100


@dataclass
class Example:
    """One unit of sampling. `segments` splits it into documents that are laid out together but
    attend only within themselves (e.g. a DPO pair: chosen then rejected); empty = one document."""

    input_ids: list[int]
    targets: list[int]
    segments: tuple[int, ...] = ()
    # True where targets are always the next token of one document, IGNORE on its last: collation
    # then derives them from the ids in one step (token shards' documents).
    next_token_targets: ClassVar[bool] = False

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.targets)
        assert not self.segments or sum(self.segments) == len(self.input_ids)

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.segments or (len(self.input_ids),)

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss."""
        return sum(t != IGNORE for t in self.targets)

    def truncated(self, length: int) -> "Example":
        """The first `length` tokens; the last keeps no target (its next token is cut off)."""
        return Example(self.input_ids[:length], self.targets[:length - 1] + [IGNORE])


def causal_example(ids: list[int], loss_mask: list[bool] | None = None) -> Example:
    """Example for next-token prediction on `ids`; loss_mask[i] says whether token i is learnt."""
    targets = ids[1:] + [IGNORE]
    if loss_mask is not None:
        targets = [t if loss_mask[i + 1] else IGNORE for i, t in enumerate(targets[:-1])] + [IGNORE]
    return Example(list(ids), targets)
