"""`kto`: Kahneman-Tversky optimisation on unpaired feedback (`{"prompt", "completion", "label"}`).

Each completion is desirable or not; no pair is needed. With r = log π(y|x) − log π_ref(y|x)
(summed over completion tokens) and z the step's KL estimate,
- `kto`: desirable λ_D·(1 − σ(β(r − z))), undesirable λ_U·(1 − σ(β(z − r)))  (KTO, eq. 7)
- `apo_zero_unpaired`: desirable 1 − σ(βr), undesirable σ(βr)  (APO-zero, unpaired; no z)
averaged over the step's completions. z = max(0, mean of log π(y'|x) − log π_ref(y'|x)) over the
step's mismatched pairs, each prompt x with the completion y' of the row before it (TRL's choice),
computed without gradient over the whole step (all micro-batches, all ranks) before its first
forward, so it does not depend on how the step is split. TRL's KTOTrainer is the parity reference
(tests/test_trl_parity.py). Rows `{"prompt", "chosen", "rejected"}` are unpaired as TRL does:
every chosen (desirable), then every rejected.

The reference is the parent unless `reference` names an ancestor; its log-probs of each completion
and of its mismatched one are cached like DPO's (`reference_logps: cached`) or computed per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from instar.data.batch import Batch
from instar.data.example import Example
from instar.errors import DataError
from instar.kinds.kto import KtoDefinition
from instar.methods.kto import KTO_LOSSES
from instar.methods.preference import document_logps
from instar.trainer.kinds.base import StepWork, TrainingKind
from instar.trainer.kinds.reference import load_reference_model, reference_stage

@dataclass
class FeedbackBatch(Batch):
    """Rows of completions with, per completion (row by row, left to right), the reference's
    log-prob, its label, and the step's KL estimate z."""

    ref_logps: "torch.Tensor | None" = None
    desirable: "torch.Tensor | None" = None  # bool
    kl: float = 0.0


@dataclass
class FeedbackExample(Example):
    """A prompt + completion (targets on the completion), its place in the dataset, its label, and
    the same prompt with the previous row's completion (`mismatched`, for the KL estimate)."""

    index: int = 0
    desirable: bool = True
    mismatched: Example | None = None


def unpair(rows: list[dict]) -> list[tuple[object, str, bool]]:
    """(prompt, completion, desirable) per completion: unpaired rows in place, each pair's chosen in
    place and its rejected after every row (TRL's order for a dataset of pairs)."""
    first, later = [], []
    for row in rows:
        if row.get("chosen") is not None:
            first.append((row["prompt"], row["chosen"], True))
            later.append((row["prompt"], row["rejected"], False))
        else:
            first.append((row["prompt"], row["completion"], bool(row["label"])))
    return first + later


class KtoKind(KtoDefinition, TrainingKind):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._tokenizer = None
        self._reference = None
        self._examples: list[FeedbackExample] = []
        self._ref_cache = None  # [n, 2] reference log-probs (completion, mismatched completion)

    def build_sources(self, tokenizer, rows_per_source):
        from instar.data.chat import chat_examples

        self._tokenizer = tokenizer
        seq_len, on_bad_row = self.ctx.spec.train.seq_len, self.ctx.spec.data.on_bad_row
        feedback = unpair(rows_per_source[0])
        if len(feedback) < 2:
            raise DataError(f"stage '{self.ctx.name}': KTO needs at least 2 completions (the KL estimate pairs each "
                            f"prompt with another row's completion); the data has {len(feedback)}")
        examples, skipped = [], 0
        for i, (prompt, completion, desirable) in enumerate(feedback):
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            other = feedback[i - 1][1]  # the previous completion (the last one for the first)
            own, mismatched = chat_examples(tokenizer, [{"messages": [*turns, {"role": "assistant", "content": c}]}
                                                        for c in (completion, other)], "last_turn")
            longest = max(len(own.input_ids), len(mismatched.input_ids))
            if longest > seq_len:
                if on_bad_row == "error":
                    raise DataError(f"stage '{self.ctx.name}': completion {i + 1} needs {longest} tokens (with its "
                                    f"prompt), more than train.seq_len={seq_len}; raise seq_len or set "
                                    f"data.on_bad_row: skip")
                skipped += 1
                continue
            examples.append(FeedbackExample(own.input_ids, own.targets, index=len(examples), desirable=desirable,
                                            mismatched=mismatched))
        if skipped and self.ctx.rank == 0:
            from instar.console import say

            say(f"[{self.ctx.name}] skipped {skipped} completions longer than seq_len", self.ctx.quiet)
        self._examples = examples
        return [examples], [1.0]

    @property
    def reference_stage(self) -> str:
        return reference_stage(self.ctx)

    def _reference_model(self, engine):
        if self._reference is None:
            self._reference = load_reference_model(self.ctx, self._tokenizer, engine)
        return self._reference

    def _as_pairs(self, examples: list[FeedbackExample]) -> list[Example]:
        """Each completion and its mismatched one as one two-segment example (the reference cache's
        layout: its log-probs come back as [n, 2])."""
        return [Example(ex.input_ids + ex.mismatched.input_ids, ex.targets + ex.mismatched.targets,
                        segments=(len(ex.input_ids), len(ex.mismatched.input_ids))) for ex in examples]

    def _reference_logps(self, engine, examples: list[FeedbackExample]):
        from instar.trainer.reference_cache import cached_pair_logps, pair_logps

        pad = self._tokenizer.pad_token_id
        if self.ctx.spec.reference_logps == "cached":
            if self._ref_cache is None:
                self._ref_cache = cached_pair_logps(self.ctx, engine, self.reference_stage,
                                                    lambda: self._reference_model(engine),
                                                    self._as_pairs(self._examples), pad)
            return self._ref_cache[[ex.index for ex in examples]]
        # One forward per micro-batch on every rank (ZeRO-3's partitioned forwards are collectives).
        with engine.autocast():
            return pair_logps(self._reference_model(engine), self._as_pairs(examples), pad, engine.device,
                              batch_size=len(examples))

    def step_batches(self, engine, batcher, rows_all, mine, layout, step) -> StepWork:
        """The micro-batches with each completion's reference log-prob and label, and the step's KL
        estimate z (no gradient), the same in every micro-batch and on every rank."""
        import torch

        from instar.data.packing import collate_rows
        from instar.trainer.losses import forward_logits

        work = super().step_batches(engine, batcher, rows_all, mine, layout, step)
        mb, pad = layout.micro_batch_size, self._tokenizer.pad_token_id
        uses_kl = KTO_LOSSES[self.ctx.spec.loss].uses_kl
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # Σ (log π − log π_ref)(y'|x), count
        for i, batch in enumerate(work.batches):
            rows = mine[i * mb:(i + 1) * mb]
            examples = [ex for row in rows for ex in row]
            ref = self._reference_logps(engine, examples).to(engine.device)
            work.batches[i] = batch.extend(FeedbackBatch, ref_logps=ref[:, 0],
                                           desirable=torch.tensor([ex.desirable for ex in examples]))
            if not uses_kl:
                continue
            mismatched = [[ex.mismatched for ex in row] for row in rows]
            kl_batch = collate_rows(mismatched, pad, max(sum(len(e.input_ids) for e in r) for r in mismatched))
            kl_batch = kl_batch.to(engine.device)
            with torch.no_grad(), engine.autocast():
                policy_kl, _ = document_logps(forward_logits(engine.model, kl_batch), kl_batch)
            total += torch.stack([(policy_kl.double() - ref[:, 1].double()).sum(), torch.tensor(
                float(len(examples)), dtype=torch.float64, device=engine.device)])
        if uses_kl:
            total = engine.all_reduce_tensor(total)
            z = max(0.0, float(total[0] / total[1]))
            for batch in work.batches:
                batch.kl = z
            work.metrics["kl"] = z
        return work

    def loss_denominator(self, rows) -> int:
        from instar.data.packing import count_examples

        return count_examples(rows)  # a mean over the step's completions

    def loss(self, model, batch, n_completions):
        from instar.trainer.losses import forward_logits
        from instar.trainer.step_metrics import Mean

        spec = self.ctx.spec
        policy, _ = document_logps(forward_logits(model, batch), batch)
        desirable = batch.desirable.to(policy.device)
        ratio = policy - batch.ref_logps.to(policy)
        losses = KTO_LOSSES[spec.loss](ratio, batch.kl, desirable, spec)
        rewards = spec.beta * ratio.detach()
        metrics = {  # means over the step's desirable / undesirable completions
            "rewards/chosen": Mean.of(rewards, desirable),
            "rewards/rejected": Mean.of(rewards, ~desirable),
            "logps/chosen": Mean.of(policy.detach(), desirable),
            "logps/rejected": Mean.of(policy.detach(), ~desirable),
        }
        return losses.sum() / n_completions, metrics
