"""When a training loop checkpoints, what it keeps (typed), and where a stage resumes from.

The files are instar.trainer.checkpoint's (atomic, hashed, verified on load); this module owns
the cadence and the loop's side of the state: the counters (`LoopState`), the data position and
what the checkpoint was made on, written to `loop.json` and read back into the same types.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from instar.errors import ContractError
from instar.models.export import remove_tree
from instar.trainer.checkpoint import (latest_checkpoint, load_fp8_histories, load_kind_state, load_rng,
                                      save_checkpoint)


@dataclass
class LoopState:
    """The loop's counters: what a resumed stage continues from."""

    step: int = 0
    tokens: int = 0
    bad_in_row: int = 0  # optimizer steps skipped in a row (non-finite loss or gradient)
    skipped_steps: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from: its counters and data position, and whether it can be loaded
    exactly (same engine, ZeRO stage and world size) or only as consolidated weights."""

    path: Path
    state: LoopState
    batcher: dict[str, Any]
    exact: bool
    engine: str
    world_size: int


class Checkpointer:
    def __init__(self, ctx, layout):
        self.ctx, self.layout = ctx, layout
        self.root = ctx.stage_dir / "checkpoints"
        self.every, self.keep = ctx.spec.train.checkpoint_every, ctx.spec.train.keep_checkpoints

    def find(self) -> ResumePoint | None:
        """The newest intact checkpoint of this configuration of the stage, or None."""
        ctx, layout = self.ctx, self.layout
        found = latest_checkpoint(self.root, ctx.checkpoint_key)
        if found is None:
            return None
        path, saved = found
        if saved["global_batch_size"] != layout.global_batch_size:
            raise ContractError(
                f"stage '{ctx.name}' has a checkpoint at step {saved['step']} made with a global batch of "
                f"{saved['global_batch_size']} rows ({saved['world_size']} ranks); this run would use "
                f"{layout.global_batch_size}. Set stages.{ctx.name}.train.global_batch_size="
                f"{saved['global_batch_size']} to resume on {ctx.world_size} rank(s) with accumulation adjusted, "
                f"or delete {path.parent} to start the stage over")
        exact = (saved["engine"], saved["world_size"], saved.get("zero_stage")) == (
            ctx.spec.distributed.engine, ctx.world_size, ctx.spec.distributed.zero_stage)
        state = LoopState(**{k: saved[k] for k in ("step", "tokens", "bad_in_row", "skipped_steps")})
        return ResumePoint(path, state, saved["batcher"], exact, saved["engine"], saved["world_size"])

    def restore(self, point: ResumePoint, engine, kind, batcher) -> LoopState:
        """Load what `point` holds into the engine (exact resume only), the kind and the data stream."""
        if point.exact:
            engine.load(point.path)
            load_rng(point.path, self.ctx.rank)
            load_fp8_histories(point.path, engine)
            kind_state = load_kind_state(point.path, self.ctx.rank)
            if kind_state is not None:
                kind.load_state_dict(kind_state)
        batcher.load_state_dict(point.batcher)
        return LoopState(**asdict(point.state))

    def discard(self) -> None:
        """Checkpoints of an earlier configuration of this stage can never be resumed (rank 0)."""
        remove_tree(self.root)

    def due(self, step: int, stop: bool) -> bool:
        """Whether to checkpoint after `step`: on the cadence (not after the last step, which the
        artifact covers) or because the stage was asked to stop."""
        last = step >= self.ctx.spec.train.steps
        return stop or bool(self.every and step % self.every == 0 and not last)

    def save(self, state: LoopState, engine, kind, batcher) -> None:
        """Every rank calls."""
        ctx, spec = self.ctx, self.ctx.spec
        record = {"key": ctx.checkpoint_key, "batcher": batcher.state_dict(), "tokens": state.tokens,
                  "bad_in_row": state.bad_in_row, "skipped_steps": state.skipped_steps,
                  "global_batch_size": self.layout.global_batch_size, "world_size": ctx.world_size,
                  "engine": engine.name, "zero_stage": spec.distributed.zero_stage}
        save_checkpoint(self.root, state.step, engine, record, keep=self.keep, kind_state=kind.state_dict())
