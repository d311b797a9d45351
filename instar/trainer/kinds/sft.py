"""`sft`: supervised fine-tuning on chat `messages`, rendered by the tokenizer's chat template.

Which tokens carry loss (`loss_on`): `assistant` (every assistant turn, default), `last_turn`
(only the final assistant turn) or `all`. The assistant tokens come from the template's
`{% generation %}` blocks, the same mechanism TRL uses, and include each turn's EOS.

A conversation longer than `train.seq_len` (`truncation`): `keep_start` cuts its end (TRL's
default), `keep_end` cuts its beginning so the final answer survives, `drop` skips it (counted)
and `error` stops with the row's number.
"""

from __future__ import annotations

from instar.data.chat import chat_examples
from instar.data.example import IGNORE, Example
from instar.errors import DataError
from instar.kinds.sft import SftDefinition
from instar.methods.input_transforms import build_transforms
from instar.trainer.kinds.base import StepWork, TrainingKind


def fit_length(examples: list[Example], seq_len: int, policy: str, stage: str) -> tuple[list[Example], int]:
    """Examples made to fit `seq_len` by `policy`, and how many were over-long."""
    out, over = [], 0
    for row, ex in enumerate(examples, start=1):
        if len(ex.input_ids) <= seq_len:
            out.append(ex)
            continue
        over += 1
        if policy == "error":
            raise DataError(f"stage '{stage}': conversation {row} is {len(ex.input_ids)} tokens, more than "
                            f"train.seq_len={seq_len}; raise seq_len or set stages.{stage}.truncation to "
                            f"keep_start, keep_end or drop")
        if policy == "keep_start":  # the last kept token has no next token to predict
            out.append(Example(ex.input_ids[:seq_len], ex.targets[:seq_len - 1] + [IGNORE]))
        elif policy == "keep_end":
            out.append(Example(ex.input_ids[-seq_len:], ex.targets[-seq_len:]))
    return out, over


class SftKind(SftDefinition, TrainingKind):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._tokenizer = None
        self._transforms = None

    def build_sources(self, tokenizer, rows_per_source):
        spec = self.ctx.spec
        self._tokenizer = tokenizer
        examples = chat_examples(tokenizer, rows_per_source[0], spec.loss_on)
        examples, over = fit_length(examples, spec.train.seq_len, spec.truncation, self.ctx.name)
        if over and self.ctx.rank == 0:
            from instar.console import say

            how = "dropped" if spec.truncation == "drop" else f"cut ({spec.truncation})"
            say(f"[{self.ctx.name}] {over} conversations longer than seq_len={spec.train.seq_len} were {how}",
                self.ctx.quiet)
        if not examples:
            raise DataError(f"stage '{self.ctx.name}': every conversation is longer than train.seq_len="
                            f"{spec.train.seq_len}; raise it")
        return [examples], [1.0]

    def step_batches(self, engine, batcher, rows_all, mine, layout, step) -> StepWork:
        """The default micro-batches with the stage's input transforms applied (targets untouched,
        so the step's denominator, counted on its rows, stays right)."""
        work = super().step_batches(engine, batcher, rows_all, mine, layout, step)
        if not self.ctx.spec.transforms:
            return work
        if self._transforms is None:
            self._transforms = build_transforms(self.ctx.spec.transforms, self._tokenizer, self.ctx.seed,
                                                self.ctx.spec.train.steps)
        mb, first = layout.micro_batch_size, self.ctx.rank * layout.micro_batch_size * layout.grad_accum
        for i, batch in enumerate(work.batches):
            for transform in self._transforms:
                batch = transform(batch, step, first + i * mb)
            work.batches[i] = batch
        return work
