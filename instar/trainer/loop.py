"""The one training loop every training kind runs.

The kind supplies examples and a loss; the loop does batching, accumulation, clipping, the
learning-rate schedule, the non-finite guard, eval and checkpoint cadence, metrics, resume,
and the artifact at the end.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from instar import __version__
from instar.console import StageProgress, say
from instar.data.formats import ROW_FORMATS
from instar.data.jsonl import read_rows
from instar.data.packing import IGNORE, Batcher
from instar.data.sampler import EpochSampler, MixtureSampler
from instar.errors import DataError, TrainingError
from instar.eval.runner import Evaluator
from instar.models.export import remove_tree, write_artifact
from instar.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from instar.trainer.context import StageContext
from instar.trainer.engine import build_engine
from instar.trainer.jsonl_log import JsonlLog
from instar.trainer.schedule import lr_at
from instar.trainer.setup import stage_model, stage_tokenizer


def artifact_meta(ctx: StageContext, final: dict[str, Any]) -> dict[str, Any]:
    """The `instar.json` of a stage artifact."""
    return {
        "stage": ctx.name,
        "kind": ctx.spec.kind,
        "fingerprint": ctx.fingerprint,
        "parents": ctx.parents,
        "config": ctx.spec.model_dump(mode="json"),
        "data": ctx.data_hashes,
        "instar_version": __version__,
        "metrics": final,
    }


def _read_sources(ctx: StageContext, kind) -> tuple[list[list[dict]], int]:
    specs = type(kind).data_specs(ctx.name, ctx.loaded.recipe.stages[ctx.name], ctx.loaded.recipe)
    row_model = ROW_FORMATS[kind.row_format]
    out, skipped = [], 0
    for path, spec in zip(ctx.data_paths, specs, strict=True):
        rows = read_rows(path, row_model, spec.on_bad_row, spec.max_rows)
        if rows.skipped:
            say(f"[{ctx.name}] skipped {rows.skipped} bad rows in {path} (first: {rows.first_skip})", ctx.quiet)
        skipped += rows.skipped
        out.append(rows.rows)
    return out, skipped


def train_stage(ctx: StageContext, kind) -> dict[str, Any]:
    spec, train, quiet = ctx.spec, ctx.spec.train, ctx.quiet
    tokenizer = stage_tokenizer(ctx, kind.needs_chat_template)
    model = stage_model(ctx, tokenizer)
    rows, skipped_rows = _read_sources(ctx, kind)
    sources, weights = kind.build_sources(tokenizer, rows)
    for i, source in enumerate(sources):
        if len(source) < ctx.world_size:
            raise DataError(f"stage '{ctx.name}': data source {i} has {len(source)} examples, fewer than "
                            f"the {ctx.world_size} ranks")
    samplers = [EpochSampler(len(s), seed=ctx.seed + i, rank=ctx.rank, world=ctx.world_size)
                for i, s in enumerate(sources)]
    batcher = Batcher(sources, MixtureSampler(samplers, weights, seed=ctx.seed), train.micro_batch_size,
                      train.seq_len, train.packing, tokenizer.pad_token_id)
    engine = build_engine(model, spec)
    model.train()
    evaluator = Evaluator(ctx, tokenizer)
    metrics_log = JsonlLog(ctx.stage_dir / "metrics.jsonl")
    eval_log = JsonlLog(ctx.stage_dir / "eval.jsonl")
    ckpt_root = ctx.stage_dir / "checkpoints"

    step, tokens, bad_in_row, skipped_steps = 0, 0, 0, 0
    resume = latest_checkpoint(ckpt_root, ctx.fingerprint)
    if resume is not None:
        path, state = resume
        load_checkpoint(path, engine)
        batcher.load_state_dict(state["batcher"])
        step, tokens = state["step"], state["tokens"]
        bad_in_row, skipped_steps = state["bad_in_row"], state["skipped_steps"]
        metrics_log.rewind_to(step)
        eval_log.rewind_to(step)
        say(f"[{ctx.name}] resuming from {path.name} (step {step}/{train.steps})", quiet)
    else:
        # Checkpoints of an earlier config of this stage can never be resumed: drop them.
        remove_tree(ckpt_root)
        metrics_log.reset()
        eval_log.reset()
        torch.manual_seed(ctx.seed)

    progress = StageProgress(ctx.name, train.steps, start=step, every=train.log_every, quiet=quiet)
    recent_losses: list[float] = []
    t_start = time.perf_counter()
    try:
        while step < train.steps:
            t0 = time.perf_counter()
            micro = [batcher.next_batch() for _ in range(train.grad_accum)]
            n_targets = max(1, sum(int((b["targets"] != IGNORE).sum()) for b in micro))
            n_tokens = sum(int((b["doc_ids"] >= 0).sum()) for b in micro)
            lr = lr_at(step, train.steps, train.lr, train.warmup_ratio, train.min_lr_ratio)
            loss_total, extra = 0.0, {}
            for batch in micro:
                with engine.autocast():
                    loss, m = kind.loss(engine.model, batch, n_targets)
                engine.backward(loss)
                loss_total += float(loss.detach())
                for key, value in m.items():
                    extra[key] = extra.get(key, 0.0) + value / len(micro)
            grad_norm, applied = engine.step(lr, train.max_grad_norm, allow=math.isfinite(loss_total))
            bad_in_row = 0 if applied else bad_in_row + 1
            skipped_steps += 0 if applied else 1
            step += 1
            tokens += n_tokens
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": n_tokens / dt, "skipped": not applied, **extra}
            metrics_log.write(record)
            if bad_in_row >= train.max_bad_steps:
                raise TrainingError(f"stage '{ctx.name}': {bad_in_row} optimizer steps in a row had a non-finite "
                                    f"loss or gradient (last at step {step}); lower stages.{ctx.name}.train.lr "
                                    f"or check the data. Checkpoints made so far are kept")
            if applied:
                recent_losses = (recent_losses + [loss_total])[-train.log_every:]
            progress.update(step, {"loss": loss_total, "lr": lr, "tok/s": n_tokens / dt})
            if spec.eval.every and step % spec.eval.every == 0 and step < train.steps and evaluator.enabled:
                eval_log.write(evaluator(engine.model, step))
            if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
                save_checkpoint(ckpt_root, step, engine,
                                {"fingerprint": ctx.fingerprint, "batcher": batcher.state_dict(), "tokens": tokens,
                                 "bad_in_row": bad_in_row, "skipped_steps": skipped_steps},
                                keep=train.keep_checkpoints)
    finally:
        progress.close()

    final_eval = evaluator(engine.model, step) if evaluator.enabled else {}
    if final_eval:
        eval_log.write(final_eval)
    final = {
        "steps": step,
        "tokens": tokens,
        "loss": sum(recent_losses) / len(recent_losses) if recent_losses else float("nan"),
        "skipped_steps": skipped_steps,
        "skipped_rows": skipped_rows,
        "truncated_examples": batcher.truncated,
        "train_seconds": round(time.perf_counter() - t_start, 2),
        **{k: v for k, v in final_eval.items() if k.startswith("exact_match/")},
    }
    write_artifact(ctx.model_dir, engine.export_model(), tokenizer, artifact_meta(ctx, final))
    return final
