"""`dpo`: preference optimisation on `{"prompt", "chosen", "rejected"}` rows.

`loss:` names a registered preference loss (`sigmoid` = DPO, `ipo`, `hinge`, `redi`; formulas and
how to add one: instar.methods.preference). `nll_coef` adds c·(−log π(y_w)/|y_w|), which keeps the
chosen answers' likelihood from falling.

Chosen and rejected go through one forward: they are one example with two segments that do not
attend to each other. The reference is the parent stage unless `reference` names another
ancestor. Its log-probs are computed once for the whole dataset and cached on disk
(`reference_logps: cached`, see instar.trainer.reference_cache) or on each batch without
gradients (`on_the_fly`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from instar.data.batch import Batch
from instar.data.example import Example
from instar.errors import DataError
from instar.kinds.dpo import DpoDefinition
from instar.methods.preference import preference_losses, segment_logps
from instar.trainer.kinds.base import StepWork, TrainingKind
from instar.trainer.kinds.reference import load_reference_model, reference_stage

LN2 = math.log(2.0)


@dataclass
class PairBatch(Batch):
    """Rows of (chosen, rejected) pairs with each pair's cached reference log-probs [pairs, 2], in
    the order `segment_logps` returns pairs (row by row, left to right); None: computed on the fly."""

    ref_logps: "torch.Tensor | None" = None


@dataclass
class PairExample(Example):
    """A (chosen, rejected) pair laid out as two segments; `index` is its place in the dataset."""

    index: int = 0


class DpoKind(DpoDefinition, TrainingKind):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._reference = None
        self._tokenizer = None
        self._check_ln2 = False
        self._examples: list[PairExample] = []
        self._ref_cache = None  # [pairs, 2] reference log-probs, when cached

    @property
    def reference_stage(self) -> str:
        return reference_stage(self.ctx)

    def build_sources(self, tokenizer, rows_per_source):
        from instar.data.chat import chat_examples

        self._tokenizer = tokenizer
        seq_len = self.ctx.spec.train.seq_len
        on_bad_row = self.ctx.spec.data.on_bad_row
        rows = self._with_policy_negatives(tokenizer, rows_per_source[0])
        examples, skipped = [], 0
        for i, row in enumerate(rows, start=1):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            convs = [{"messages": [*prompt, {"role": "assistant", "content": row[k]}]} for k in ("chosen", "rejected")]
            chosen, rejected = chat_examples(tokenizer, convs, "last_turn")
            if len(chosen.input_ids) + len(rejected.input_ids) > seq_len:
                if on_bad_row == "error":
                    raise DataError(f"stage '{self.ctx.name}': preference row {i} needs "
                                    f"{len(chosen.input_ids) + len(rejected.input_ids)} tokens for chosen + rejected, "
                                    f"more than train.seq_len={seq_len}; raise seq_len or set data.on_bad_row: skip")
                skipped += 1
                continue
            examples.append(PairExample(chosen.input_ids + rejected.input_ids, chosen.targets + rejected.targets,
                                        segments=(len(chosen.input_ids), len(rejected.input_ids)),
                                        index=len(examples)))
        if skipped and self.ctx.rank == 0:
            from instar.console import say

            say(f"[{self.ctx.name}] skipped {skipped} preference rows longer than seq_len", self.ctx.quiet)
        self._examples = examples
        return [examples], [1.0]

    def _with_policy_negatives(self, tokenizer, rows: list[dict]) -> list[dict]:
        cfg = self.ctx.spec.negatives
        if cfg is None:
            return rows
        from instar.console import say
        from instar.models.build import load_pretrained
        from instar.trainer.on_policy import split_policy_negatives

        from instar.trainer.engine import resolve_device

        if self.ctx.world_size > 1:  # before the engine exists: the ranks gather their slices' rows
            from instar.trainer.deepspeed_engine import init_distributed

            init_distributed()
        model = load_pretrained(self.ctx.parent_model_dir(self.ctx.parents[0]))
        model = model.to(resolve_device(self.ctx.spec.distributed.device, self.ctx.name))  # sample on the GPU
        rows, replaced = split_policy_negatives(model, tokenizer, rows, cfg, self.ctx.seed, self.ctx.rank,
                                                self.ctx.world_size)
        say(f"[{self.ctx.name}] on-policy negatives: {replaced} rows got a rejected answer sampled from "
            f"'{self.ctx.parents[0]}'; {len(rows)} rows in all (see pairs.jsonl)", self.ctx.quiet or self.ctx.rank != 0)
        if self.ctx.rank == 0:  # the pairs actually trained on, for inspection (and controls)
            from instar.data.jsonl import write_rows

            write_rows(self.ctx.stage_dir / "pairs.jsonl", rows)
        if not rows:
            raise DataError(f"stage '{self.ctx.name}': '{self.ctx.parents[0]}' answered every prompt right in "
                            f"{cfg.samples} samples, so only_mistakes left no pair; raise negatives.temperature "
                            f"or negatives.samples, or set only_mistakes: false")
        return rows

    def step_batches(self, engine, batcher, rows_all, mine, layout, step) -> StepWork:
        """The default micro-batches, plus each pair's cached reference log-probs in the order
        `segment_logps` returns pairs (row by row, left to right)."""
        work = super().step_batches(engine, batcher, rows_all, mine, layout, step)
        if self.ctx.spec.reference_free or self.ctx.spec.reference_logps != "cached":
            if not self.ctx.spec.reference_free:
                self._reference_model(engine)  # `loss` runs it on each batch
            work.batches = [batch.extend(PairBatch) for batch in work.batches]
            return work
        if self._ref_cache is None:
            from instar.trainer.reference_cache import cached_pair_logps

            self._ref_cache = cached_pair_logps(self.ctx, engine, self.reference_stage,
                                                lambda: self._reference_model(engine), self._examples,
                                                self._tokenizer.pad_token_id)
        mb = layout.micro_batch_size
        for i, batch in enumerate(work.batches):
            index = [ex.index for row in mine[i * mb:(i + 1) * mb] for ex in row]
            work.batches[i] = batch.extend(PairBatch, ref_logps=self._ref_cache[index])
        return work

    def loss_denominator(self, rows) -> int:
        from instar.data.packing import count_examples

        return count_examples(rows)  # the loss is a mean over pairs

    def on_train_start(self, step: int) -> None:
        spec = self.ctx.spec
        self._check_ln2 = (step == 0 and spec.loss == "sigmoid" and spec.label_smoothing == 0
                           and spec.nll_coef == 0 and self.reference_stage == self.ctx.parents[0])

    def _reference_model(self, engine):
        if self._reference is None:
            self._reference = load_reference_model(self.ctx, self._tokenizer, engine)
        return self._reference

    def loss(self, model, batch, n_pairs):
        import torch

        from instar.trainer.losses import forward_logits
        from instar.trainer.step_metrics import Mean

        policy_c, policy_r, n_c, n_r = segment_logps(forward_logits(model, batch), batch)
        spec = self.ctx.spec
        if spec.reference_free:
            ref_c = ref_r = torch.zeros_like(policy_c)
        elif batch.ref_logps is not None:
            ref_c, ref_r = batch.ref_logps.to(policy_c).unbind(-1)
        else:
            with torch.no_grad():  # step_batches loaded the reference
                ref_c, ref_r, _, _ = segment_logps(forward_logits(self._reference, batch), batch)
        losses, reward_c, reward_r = preference_losses(policy_c, policy_r, ref_c, ref_r, n_c, n_r, spec)
        if self._check_ln2:
            self._check_ln2 = False
            first = float(losses.detach().mean())
            if abs(first - LN2) > 1e-3:
                from instar.console import say

                say(f"[{self.ctx.name}] warning: the sigmoid DPO loss at step 0 is {first:.5f}, not ln 2 = "
                    f"{LN2:.5f}: the policy does not start equal to the reference '{self.reference_stage}' "
                    f"(a reference or adapter mix-up?)")
        reward_c, reward_r = reward_c.detach(), reward_r.detach()
        metrics = {  # means over the step's pairs
            "rewards/chosen": Mean.of(reward_c),
            "rewards/rejected": Mean.of(reward_r),
            "rewards/margin": Mean.of(reward_c - reward_r),
            "rewards/accuracy": Mean.of((reward_c > reward_r).double()),
            "logps/chosen": Mean.of(policy_c.detach() / n_c),
        }
        return losses.sum() / n_pairs, metrics
