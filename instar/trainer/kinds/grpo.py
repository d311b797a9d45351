"""`grpo`: reinforcement learning from rewards on `{"prompt", "answer"}` rows (GRPO family).

Each step's prompts are split across ranks; every rank samples `group_size` completions per
prompt from the current policy (KV-cached decoding, temperature / top_p, stop at EOS), scores
them with the stage's reward functions, and turns the rewards into group-normalised advantages.
The rollout is then trained on for `epochs` optimizer steps with the clipped importance ratio
against the sampling policy and, when `beta` > 0, a k3 KL penalty to the reference stage
(the parent by default). The arithmetic lives in `instar.methods.rl`.

A rollout reused over several steps is part of the checkpoint (`kind_rank<k>.pt`), so a killed
stage resumes mid-rollout exactly. `rollouts.jsonl` lists every prompt drawn (step, row, prompt,
answer) and, for rank 0's prompts, the sampled completions and their rewards.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any

from instar.data.batch import Batch
from instar.data.example import IGNORE, Example
from instar.errors import DataError
from instar.kinds.grpo import GrpoDefinition
from instar.methods.rl import LOSS_TYPES
from instar.models.wrapped import hf_model
from instar.trainer.kinds.base import StepWork, TrainingKind
from instar.trainer.kinds.reference import load_reference_model


@dataclass
class RolloutBatch(Batch):
    """Rows of prompt + sampled completion (one completion a row, groups in order), with what the
    GRPO objective needs per completion, kept on the device while the rollout is trained on."""

    advantages: "torch.Tensor | None" = None  # [rows]
    prompt_lens: "torch.Tensor | None" = None  # [rows]
    completion_lens: "torch.Tensor | None" = None  # [rows]
    old_logp: "torch.Tensor | None" = None  # [rows, T] the sampling policy's, when a rollout serves several steps
    ref_logp: "torch.Tensor | None" = None  # [rows, T] the reference's, when beta > 0

    def state(self) -> dict:
        """Its fields as a dict of tensors (a checkpoint is read with weights_only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class PromptExample(Example):
    """A prompt row: its token ids (targets all ignored), text, reference answer and row number."""

    prompt: str = ""
    answer: str = ""
    row: int = 0


def _gather_stats(engine, values: list[float]) -> tuple[float, float, float]:
    """(count, mean, unbiased std) of values over every rank."""
    n = engine.all_reduce_sum(float(len(values)))
    total = engine.all_reduce_sum(float(sum(values)))
    sq = engine.all_reduce_sum(float(sum(v * v for v in values)))
    mean = total / max(n, 1.0)
    var = (sq - n * mean * mean) / max(n - 1.0, 1.0)
    return n, mean, math.sqrt(max(var, 0.0))


class GrpoKind(GrpoDefinition, TrainingKind):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._tokenizer = None
        self._reference = None
        self._rewards = None
        self._rollout: dict[str, Any] | None = None  # the batches being trained on, and their stats
        self._rollout_step = -1
        self._log = None  # rollouts.jsonl (rank 0)
        self._samples: list[tuple[str, float]] = []  # this rank's last (completion, reward) pairs

    # --- data ---
    def build_sources(self, tokenizer, rows_per_source):
        from instar.eval.exact_match import encode_prompt

        self._tokenizer = tokenizer
        spec = self.ctx.spec
        room = spec.train.seq_len - spec.max_new_tokens
        examples, skipped = [], 0
        for i, row in enumerate(rows_per_source[0], start=1):
            ids = encode_prompt(tokenizer, row["prompt"], "chat")
            if len(ids) > room:
                if spec.data.on_bad_row == "error":
                    raise DataError(f"stage '{self.ctx.name}': prompt row {i} is {len(ids)} tokens; with "
                                    f"max_new_tokens={spec.max_new_tokens} only {room} fit in train.seq_len="
                                    f"{spec.train.seq_len}. Raise seq_len, lower max_new_tokens or set "
                                    f"data.on_bad_row: skip")
                skipped += 1
                continue
            examples.append(PromptExample(ids, [IGNORE] * len(ids), prompt=row["prompt"], answer=row["answer"], row=i))
        if skipped and self.ctx.rank == 0:
            from instar.console import say

            say(f"[{self.ctx.name}] skipped {skipped} prompts too long for seq_len - max_new_tokens", self.ctx.quiet)
        if not examples:
            raise DataError(f"stage '{self.ctx.name}': no prompt fits; raise train.seq_len")
        return [examples], [1.0]

    # --- rollouts ---
    def needs_rows(self, step: int) -> bool:
        return self._rollout is None or step - self._rollout_step >= self.ctx.spec.epochs

    def on_train_start(self, step: int) -> None:
        if self.ctx.rank == 0:
            from instar.trainer.jsonl_log import JsonlLog

            self._log = JsonlLog(self.ctx.stage_dir / "rollouts.jsonl")
            if step:
                self._log.rewind_to(step)
            else:
                self._log.reset()

    def _log_rollout(self, rows_all: list, mine: list, step: int) -> None:
        g = self.ctx.spec.group_size
        own = {id(ex): i for i, ex in enumerate(ex for row in mine for ex in row)}
        for ex in (ex for row in rows_all for ex in row):
            record = {"step": step + 1, "row": ex.row, "prompt": ex.prompt, "answer": ex.answer}
            if id(ex) in own:
                samples = self._samples[own[id(ex)] * g:(own[id(ex)] + 1) * g]
                record.update(completions=[c for c, _ in samples], rewards=[r for _, r in samples])
            self._log.write(record)

    def step_batches(self, engine, batcher, rows_all, mine, layout, step) -> StepWork:
        fresh = self.needs_rows(step)
        if fresh:
            self._rollout = self._make_rollout(engine, mine, layout, step)
            self._rollout_step = step
            if self._log is not None:
                self._log_rollout(rows_all, mine, step)
        r = self._rollout
        return StepWork(r["batches"], r["denominator"], r["tokens"], r["generate_seconds"] if fresh else 0.0,
                        metrics=r["stats"])

    def _sample(self, engine, prompts: list[list[int]], first: int, step: int) -> list[list[int]]:
        """`group_size` completions of each prompt; `first` is the global index of prompts[0] in
        the step. Every completion has its own generator seeded by (stage seed, step, prompt,
        sample), so the rollout is the same whatever the ranks, batch split or resume point."""
        import torch

        from instar.eval.generate import decode_batch, sampling_pick

        spec, tok, g = self.ctx.spec, self._tokenizer, self.ctx.spec.group_size
        generators = [torch.Generator().manual_seed(zlib.crc32(f"{self.ctx.seed}:{step}:{first + i // g}:{i % g}"
                                                                .encode()))
                      for i in range(len(prompts) * g)]
        repeated = [p for p in prompts for _ in range(g)]
        pick = sampling_pick(spec.temperature, spec.top_p, generators)
        with engine.generation_model() as model:
            was_training = model.training
            model.eval()
            try:
                with torch.inference_mode(), engine.autocast():
                    return decode_batch(model, repeated, spec.max_new_tokens, [tok.eos_token_id], tok.pad_token_id,
                                        pick)
            finally:
                model.train(was_training)

    def _make_rollout(self, engine, mine: list, layout, step: int) -> dict[str, Any]:
        import torch

        from instar.data.packing import collate_rows
        from instar.methods.rewards import RewardModel
        from instar.methods.rl import group_advantages

        spec, tok, g = self.ctx.spec, self._tokenizer, self.ctx.spec.group_size
        if self._rewards is None:
            self._rewards = RewardModel(self.ctx.name, [(r.fn, r.weight) for r in spec.rewards])
        prompts: list[PromptExample] = [ex for row in mine for ex in row]
        t0 = time.perf_counter()
        completions = self._sample(engine, [p.input_ids for p in prompts], self.ctx.rank * len(prompts), step)
        generate_seconds = time.perf_counter() - t0

        rewards, sequences, lengths = [], [], []
        self._samples = []
        for i, ids in enumerate(completions):
            p = prompts[i // g]
            text = tok.decode(ids, skip_special_tokens=True)
            rewards.append(self._rewards(p.row, p.prompt, text, p.answer))
            self._samples.append((text, rewards[-1]))
            full = p.input_ids + ids
            targets = [IGNORE] * (len(p.input_ids) - 1) + ids + [IGNORE]
            sequences.append(Example(full, targets))
            lengths.append(len(ids))
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        n_all, reward_mean, reward_std = _gather_stats(engine, rewards)
        advantages = group_advantages(reward_t, g, spec.scale_rewards, batch_std=reward_std)  # std over all ranks
        flat_groups = float((reward_t.view(-1, g).std(1) == 0).sum())
        completion_tokens = engine.all_reduce_sum(float(sum(lengths)))
        denominator = LOSS_TYPES[spec.loss_type].denominator(completions=n_all, tokens=completion_tokens,
                                                             max_new_tokens=spec.max_new_tokens)

        per_micro = layout.micro_batch_size * g
        batches = []
        for m in range(layout.grad_accum):
            part = range(m * per_micro, (m + 1) * per_micro)
            batch = collate_rows([[sequences[i]] for i in part], tok.pad_token_id,
                                 max(len(sequences[i].input_ids) for i in part))
            batch = batch.extend(RolloutBatch, advantages=advantages[m * per_micro:(m + 1) * per_micro].clone(),
                                 prompt_lens=torch.tensor([len(prompts[i // g].input_ids) for i in part]),
                                 completion_lens=torch.tensor([lengths[i] for i in part]))
            batch = batch.to(engine.device)  # kept there while the rollout is trained on
            self._add_fixed_logps(engine, batch)
            batches.append(batch)
        stats = {
            "reward/mean": reward_mean,
            "reward/std": reward_std,
            "completion_length": completion_tokens / max(n_all, 1.0),
            "zero_std_groups": engine.all_reduce_sum(flat_groups) / max(n_all / g, 1.0),
        }
        tokens = int(engine.all_reduce_sum(float(sum(len(s.input_ids) for s in sequences))))
        return {"batches": batches, "denominator": denominator, "tokens": tokens,
                "generate_seconds": generate_seconds, "stats": stats}

    def _add_fixed_logps(self, engine, batch) -> None:
        """Log-probs that stay fixed while the rollout is trained on: the sampling policy's (only
        needed when a rollout serves several steps; with one step ρ = 1 exactly) and the
        reference's (only when beta > 0)."""
        import torch

        spec = self.ctx.spec
        with torch.no_grad(), engine.autocast():
            if spec.epochs > 1:
                batch.old_logp = self._logps(engine.model, batch).float()
            if spec.beta > 0:
                batch.ref_logp = self._logps(self._reference_model(engine), batch).float()

    def _logps(self, model, batch):
        """log π(completion token | prefix) per position of a rollout micro-batch [rows, T] (0 off
        the completions): through `shared_prompt_logps` where it applies, else one forward of
        every whole row."""
        from instar.trainer.losses import forward_logits
        from instar.methods.rl import token_logps

        spec = self.ctx.spec
        if shares_prompts(model, batch, spec.group_size):
            return shared_prompt_logps(model, batch, spec.group_size, spec.temperature)
        return token_logps(forward_logits(model, batch), batch.targets, spec.temperature)

    def _reference_model(self, engine):
        if self._reference is None:
            self._reference = load_reference_model(self.ctx, self._tokenizer, engine)
        return self._reference

    # --- objective ---
    def loss(self, model, batch, denominator):
        from instar.methods.rl import per_token_loss, reduce_loss
        from instar.trainer.step_metrics import Mean

        spec = self.ctx.spec
        logp = self._logps(model, batch)
        old = batch.old_logp if batch.old_logp is not None else logp.detach()
        per_token, info = per_token_loss(logp, old, batch.advantages, batch.ref_logp, spec.clip_eps,
                                         spec.beta, spec.clip_eps_high)
        mask = batch.targets != IGNORE
        loss = reduce_loss(per_token, mask, spec.loss_type, denominator)
        metrics = {"clip_fraction": Mean.of(info["clipped"], mask)}  # means over the step's completion tokens
        if "kl" in info:
            metrics["kl"] = Mean.of(info["kl"], mask)
        return loss, metrics

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any] | None:
        if self._rollout is None or self.ctx.spec.epochs == 1:
            return None  # a one-step rollout is never reused: nothing to keep
        rollout = {**self._rollout, "batches": [b.state() for b in self._rollout["batches"]]}
        return {"rollout": rollout, "rollout_step": self._rollout_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rollout = state["rollout"]
        self._rollout = {**rollout, "batches": [RolloutBatch(**b) for b in rollout["batches"]]}
        self._rollout_step = int(state["rollout_step"])


def shares_prompts(model, batch: dict, group_size: int) -> bool:
    """Whether `shared_prompt_logps` applies: a rollout batch of whole groups (with its prompt and
    completion lengths) and an HF model whose forward takes a KV cache and `logits_to_keep`, run
    without what two forward calls per micro-batch would change: ZeRO-3's per-module hooks, FP8's
    per-call amax histories, gradient checkpointing (HF turns the cache off under it), flash-attn's
    varlen packing."""
    import inspect

    from instar.kernels.fp8.linear import Float8Linear
    from instar.models.attention import uses_flash_attention

    if (not isinstance(batch, RolloutBatch) or batch.prompt_lens is None or batch.completion_lens is None
            or batch.input_ids.shape[0] % group_size):
        return False
    hf = hf_model(model)
    params = inspect.signature(hf.forward).parameters
    # A walk over the modules per micro-batch: microseconds next to the forward it saves.
    return ("logits_to_keep" in params and ("cache" in params or "past_key_values" in params)
            and not uses_flash_attention(hf) and not _checkpointing(hf)
            and not any(hasattr(p, "ds_id") for p in hf.parameters())  # ZeRO-3 partitions
            and not any(isinstance(m, Float8Linear) for m in hf.modules()))


def _checkpointing(hf) -> bool:
    flag = getattr(type(hf), "is_activation_checkpointing", None)  # transformers >= 5.x's name
    return bool(getattr(hf, "is_activation_checkpointing" if flag is not None else "is_gradient_checkpointing", False))


def shared_prompt_logps(model, batch: dict, group_size: int, temperature: float):
    """`token_logps(forward_logits(model, batch), targets, temperature)` of a rollout micro-batch,
    computing each group's prompt once: the group's `group_size` rows share it, and attention makes
    the prompt's hidden states independent of what follows. One forward runs the distinct prompts
    (right-padded, plain causal attention) and keeps their KV cache; the cache is repeated per
    completion and a second forward runs the completions on it (a padding mask hides the shorter
    prompts' and completions' padding). Gradients flow through the shared cache, so they are the
    whole rows' gradients up to float rounding, at a fraction of the tokens: GRPO's prompts are
    usually most of every row."""
    import inspect

    import torch

    from instar.methods.rl import token_logps

    hf = hf_model(model)
    cache_name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    ids = batch.input_ids
    rows, width = ids.shape
    device = ids.device
    prompt_lens, completion_lens = batch.prompt_lens.to(device), batch.completion_lens.to(device)
    first = torch.arange(0, rows, group_size, device=device)
    plen = prompt_lens[first]
    pmax, cmax = int(plen.max()), int(completion_lens.max())
    prompt_pos = torch.arange(pmax, device=device)
    prompt_mask = prompt_pos[None] < plen[:, None]
    prompt_ids = ids[first, :pmax].masked_fill(~prompt_mask, 0)  # padding (after the prompt) is never attended to
    last = plen - 1  # the position whose logits predict the first completion token
    keep = torch.unique(last)
    out = model(input_ids=prompt_ids, position_ids=prompt_pos[None].expand(len(first), -1), use_cache=True,
                logits_to_keep=keep)
    first_logits = out.logits[torch.arange(len(first), device=device), torch.searchsorted(keep, last)]
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache
    for layer in cache.layers:
        layer.batch_repeat_interleave(group_size)
    step = torch.arange(cmax, device=device)
    completion_mask = step[None] < completion_lens[:, None]
    completion_ids = ids.gather(1, (prompt_lens[:, None] + step[None]).clamp(max=width - 1))
    completion_ids = completion_ids.masked_fill(~completion_mask, 0)
    attention = torch.cat([prompt_mask.repeat_interleave(group_size, 0), completion_mask], 1).long()
    out = model(input_ids=completion_ids, attention_mask=attention, position_ids=prompt_lens[:, None] + step[None],
                use_cache=True, **{cache_name: cache})
    logits = torch.cat([first_logits.repeat_interleave(group_size, 0)[:, None], out.logits[:, :-1]], 1)
    logp = token_logps(logits, completion_ids.masked_fill(~completion_mask, IGNORE), temperature)
    # back to the rows' layout: completion token j of row r is the target at position prompt_len - 1 + j
    # (positions past a row's end receive 0s, at most clamped onto its last position, never a target)
    where = (prompt_lens[:, None] - 1 + step[None]).clamp(max=width - 1)
    return torch.zeros(rows, width, dtype=logp.dtype, device=device).scatter(1, where, logp)
