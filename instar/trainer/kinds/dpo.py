"""`dpo`: preference optimisation on `{"prompt", "chosen", "rejected"}` rows.

Losses (h = policy-minus-reference log-ratio of chosen minus that of rejected, summed over
completion tokens; see ../shared/notes/algorithms.md):
- `sigmoid` (DPO): −(1−ε)·log σ(βh) − ε·log σ(−βh), ε = label_smoothing
- `ipo`: (h − 1/(2β))² with per-token mean log-probs (as TRL does)
- `hinge`: max(0, 1 − βh)
- `redi` (reference-free): −log π(y_w)/|y_w| + α·log π(y_l)/|y_l|
`nll_coef` adds c·(−log π(y_w)/|y_w|), which keeps the chosen answers' likelihood from falling.

Chosen and rejected go through one forward: they are one example with two segments that do not
attend to each other. The reference is the parent stage unless `reference` names another
ancestor. Its log-probs are computed once for the whole dataset and cached on disk
(`reference_logps: cached`, see instar.trainer.reference_cache) or on each batch without
gradients (`on_the_fly`).
"""

from __future__ import annotations

import math
from typing import Literal

from dataclasses import dataclass

from pydantic import Field

from instar.config.schema import Recipe, StageSpec, Strict
from instar.data.example import Example
from instar.errors import DataError
from instar.trainer.kinds.base import StepWork, TrainingKind
from instar.trainer.kinds.reference import check_reference, load_reference_model, reference_stage

LN2 = math.log(2.0)


class OnPolicyNegatives(Strict):
    """Replace each row's `rejected` by a wrong answer sampled from the stage's starting model."""

    samples: int = Field(default=4, ge=1)  # completions drawn per prompt
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)
    only_mistakes: bool = False  # drop rows the model always got right (else keep the data's rejected)


class DpoSpec(StageSpec):
    loss: Literal["sigmoid", "ipo", "hinge", "redi"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    alpha: float = Field(default=0.8, ge=0)  # REDI: weight of the rejected term
    nll_coef: float = Field(default=0.0, ge=0)
    reference: str | None = None  # an ancestor stage; default: the first parent
    reference_logps: Literal["cached", "on_the_fly"] = "cached"
    negatives: OnPolicyNegatives | None = None  # on-policy rejected answers


@dataclass
class PairExample(Example):
    """A (chosen, rejected) pair laid out as two segments; `index` is its place in the dataset."""

    index: int = 0


def preference_losses(policy_c, policy_r, ref_c, ref_r, n_c, n_r, spec) -> tuple:
    """Per-pair losses and rewards from summed completion log-probs (tensors of shape [P])."""
    import torch.nn.functional as F

    h = (policy_c - ref_c) - (policy_r - ref_r)
    if spec.loss == "sigmoid":
        eps = spec.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(spec.beta * h) - eps * F.logsigmoid(-spec.beta * h)
    elif spec.loss == "ipo":
        h_mean = (policy_c - ref_c) / n_c - (policy_r - ref_r) / n_r
        losses = (h_mean - 1 / (2 * spec.beta)) ** 2
    elif spec.loss == "hinge":
        losses = F.relu(1 - spec.beta * h)
    else:
        losses = -policy_c / n_c + spec.alpha * policy_r / n_r
    if spec.nll_coef:
        losses = losses + spec.nll_coef * (-policy_c / n_c)
    return losses, spec.beta * (policy_c - ref_c), spec.beta * (policy_r - ref_r)


def segment_logps(logits, batch) -> tuple:
    """Summed target log-probs and target counts per (chosen, rejected) pair in the batch.

    Pairs are laid out as consecutive documents (chosen = even document id, rejected = odd)."""
    import torch

    from instar.data.packing import IGNORE

    targets = batch["targets"]
    valid = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    logp = logp * valid
    docs = int(batch["doc_ids"].max()) + 1
    index = batch["doc_ids"].clamp(min=0)
    sums = torch.zeros(targets.shape[0], docs, dtype=logp.dtype, device=logp.device).scatter_add_(1, index, logp)
    counts = torch.zeros(targets.shape[0], docs, dtype=logp.dtype, device=logp.device).scatter_add_(
        1, index, valid.to(logp.dtype))
    pairs = counts[:, 0::2] > 0
    chosen_sum, rejected_sum = sums[:, 0::2][pairs], sums[:, 1::2][pairs]
    chosen_n, rejected_n = counts[:, 0::2][pairs], counts[:, 1::2][pairs]
    return chosen_sum, rejected_sum, chosen_n, rejected_n


class DpoKind(TrainingKind):
    name = "dpo"
    Spec = DpoSpec
    min_parents = 1
    row_format = "preference"
    needs_chat_template = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self._reference = None
        self._tokenizer = None
        self._check_ln2 = False
        self._examples: list[PairExample] = []
        self._ref_cache = None  # [pairs, 2] reference log-probs, when cached

    @classmethod
    def check(cls, name: str, spec: DpoSpec, recipe: Recipe) -> list[str]:
        problems = super().check(name, spec, recipe) + check_reference(name, spec.reference, recipe)
        if spec.loss == "redi" and spec.reference is not None:
            problems.append(f"stages.{name}.reference: loss `redi` is reference-free; drop `reference`")
        return problems

    @property
    def reference_stage(self) -> str:
        return reference_stage(self.ctx)

    def build_sources(self, tokenizer, rows_per_source):
        from instar.trainer.kinds.sft import chat_examples

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
        if self.ctx.spec.loss == "redi":
            return work
        if self.ctx.spec.reference_logps != "cached":
            self._reference_model(engine)  # `loss` runs it on each batch
            return work
        if self._ref_cache is None:
            from instar.trainer.reference_cache import cached_pair_logps

            self._ref_cache = cached_pair_logps(self.ctx, engine, self.reference_stage,
                                                lambda: self._reference_model(engine), self._examples,
                                                self._tokenizer.pad_token_id)
        mb = layout.micro_batch_size
        for i, batch in enumerate(work.batches):
            index = [ex.index for row in mine[i * mb:(i + 1) * mb] for ex in row]
            batch["ref_logps"] = self._ref_cache[index]
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

        policy_c, policy_r, n_c, n_r = segment_logps(forward_logits(model, batch), batch)
        spec = self.ctx.spec
        if spec.loss == "redi":
            ref_c = ref_r = torch.zeros_like(policy_c)
        elif "ref_logps" in batch:
            ref_c, ref_r = batch["ref_logps"].to(policy_c).unbind(-1)
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
        metrics = {
            "rewards/chosen": float(reward_c.mean()),
            "rewards/rejected": float(reward_r.mean()),
            "rewards/margin": float((reward_c - reward_r).mean()),
            "rewards/accuracy": float((reward_c > reward_r).float().mean()),
            "logps/chosen": float((policy_c.detach() / n_c).mean()),
        }
        return losses.sum() / n_pairs, metrics
