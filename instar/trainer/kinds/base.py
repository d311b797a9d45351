"""How a stage kind runs. A kind's runtime class subclasses its definition (instar.kinds: settings,
capabilities, checks) and `StageKind`: training kinds subclass `TrainingKind` and give
`build_sources` (and `loss` when it is not next-token cross-entropy, declaring
`causal_lm_loss = False`); the shared loop does the rest. Other kinds (merge) give `run`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from instar.data.packing import Example
    from instar.trainer.context import StageContext
    from instar.trainer.step_metrics import Mean


@dataclass
class StepWork:
    """What one optimizer step trains on, on this rank."""

    batches: list[dict[str, Any]]  # this rank's micro-batches
    denominator: float  # what the step's summed loss is divided by (whole step, every rank)
    tokens: int  # tokens the step trains on, every rank
    generate_seconds: float = 0.0  # time spent sampling (RL rollouts), not loading data
    metrics: dict[str, float] = field(default_factory=dict)  # step-wide values, already over every rank


class StageKind(ABC):
    """A stage of some kind, for one run of it (`ctx`)."""

    def __init__(self, ctx: "StageContext"):
        self.ctx = ctx

    @abstractmethod
    def run(self) -> dict[str, Any]:
        """Run the stage and write its artifact; returns its final metrics."""


class TrainingKind(StageKind):
    """A kind trained by the shared loop (`instar.trainer.loop`)."""


    def run(self) -> dict[str, Any]:
        from instar.trainer.loop import train_stage

        return train_stage(self.ctx, self)

    @abstractmethod
    def build_sources(self, tokenizer, rows_per_source: list[list[dict]]) -> tuple[list[list["Example"]], list[float]]:
        """Tokenised examples per data source (rows in `data_specs` order) and each source's weight."""

    def on_train_start(self, step: int) -> None:
        """Called once before the first step (0, or the step a resumed stage continues from)."""

    def needs_rows(self, step: int) -> bool:
        """Whether step `step` draws fresh rows from the data (RL kinds reuse a rollout)."""
        return True

    def step_batches(self, engine, batcher, rows_all: list, mine: list, layout, step: int) -> StepWork:
        """The micro-batches this rank runs for one step, from the step's global rows (`rows_all`)
        and this rank's share of them (`mine`)."""
        from instar.data.packing import count_tokens

        mb = layout.micro_batch_size
        batches = [batcher.collate(mine[i * mb:(i + 1) * mb]) for i in range(layout.grad_accum)]
        return StepWork(batches, max(1, self.loss_denominator(rows_all)), count_tokens(rows_all))

    def state_dict(self) -> dict[str, Any] | None:
        """Per-rank state to keep in checkpoints (tensors, numbers, strings), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (same world size only)."""

    def loss_denominator(self, rows: list[list["Example"]]) -> int:
        """What the step's loss is averaged over, counted on the global batch's rows: target tokens
        (every token weighs the same, whatever the accumulation and ranks)."""
        from instar.data.packing import count_targets

        return count_targets(rows)

    def loss(self, model, batch: dict[str, "torch.Tensor"], n_targets: int) -> tuple["torch.Tensor", dict[str, "Mean"]]:
        """Loss of one micro-batch, already divided by `loss_denominator` of the whole step, and
        its metrics as sums and counts (`instar.trainer.step_metrics.Mean`; the loop reduces them
        over the step's micro-batches and ranks). The same metric names on every call."""
        from instar.trainer.losses import causal_lm_loss

        return causal_lm_loss(model, batch, n_targets)
