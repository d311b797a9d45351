"""A collated micro-batch, typed: what every forward reads, and what each kind adds to it.

`collate_rows` makes a `Batch`; a kind that needs more per row (DPO's cached reference log-probs,
GRPO's advantages, KTO's labels) makes its own subclass with `Batch.extend`. Tensor fields move to
a device together (`to`); nothing is looked up by a string key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch

B = TypeVar("B", bound="Batch")


@dataclass
class Batch:
    """Rows of packed examples as [rows, seq] tensors (see instar.data.packing.collate_rows)."""

    input_ids: torch.Tensor
    targets: torch.Tensor  # the next token to predict at each position, IGNORE where none is learnt
    position_ids: torch.Tensor  # restart at 0 for every document of a row
    doc_ids: torch.Tensor  # the document each position belongs to within its row; -1 is padding
    # Every row is one document from position 0 (decided on the host from the lengths): attention
    # then needs no block-diagonal mask (see instar.trainer.losses.attention_mask).
    one_document_per_row: bool

    def to(self: B, device: torch.device) -> B:
        """This batch with every tensor on `device` (a no-op for those already there)."""
        moved = {f.name: value.to(device, non_blocking=True) for f in dataclasses.fields(self)
                 if isinstance(value := getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def replace(self: B, **changes) -> B:
        return dataclasses.replace(self, **changes)

    def extend(self, cls: type[B], **extra) -> B:
        """This batch as the kind's batch type `cls` (a subclass), with its own fields `extra`."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Batch)}, **extra)

    def rows(self, part: slice) -> "Batch":
        """The rows `part` of a plain collated batch."""
        assert type(self) is Batch, "a kind's batch lays its extra fields out per example, not per row"
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[part] for f in dataclasses.fields(self)
                                            if f.name != "one_document_per_row"})
