"""The one training loop every training kind runs, on one process or many ranks.

The kind supplies examples and a loss; the loop does batching, accumulation, clipping, the
learning-rate schedule, the non-finite guard, eval and checkpoint cadence, metrics, resume,
and the artifact at the end. Rank 0 alone prints, logs metrics, evaluates and writes the
artifact; every rank takes part in the collectives (steps, checkpoints, gathering weights).
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
from instar.data.packing import Batcher
from instar.data.sampler import EpochSampler, MixtureSampler
from instar.errors import ContractError, TrainingError
from instar.eval.runner import Evaluator
from instar.models.export import remove_tree, write_artifact
from instar.models.attention import FLASH, select_attention
from instar.models.fp8 import Fp8GemmCheck
from instar.trainer.batch import batch_layout
from instar.trainer.checkpoint import (latest_checkpoint, load_fp8_histories, load_kind_state, load_rng,
                                      save_checkpoint)
from instar.trainer.context import StageContext
from instar.trainer.engine import build_engine, engine_class, to_device
from instar.trainer.flops import MfuMeter, cuda_device_name
from instar.trainer.jsonl_log import JsonlLog
from instar.trainer.metric_mirrors import MetricMirrors, check_available
from instar.trainer.schedule import lr_at
from instar.trainer.step_metrics import StepMetrics
from instar.trainer.stop import Preempted, signal_name, stop_requested
from instar.trainer.setup import stage_model, stage_tokenizer
from instar.trainer.single_engine import load_weights


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def artifact_meta(ctx: StageContext, final: dict[str, Any]) -> dict[str, Any]:
    """The `instar.json` of a stage artifact."""
    return {
        "stage": ctx.name,
        "kind": ctx.spec.kind,
        "fingerprint": ctx.fingerprint,
        "parents": ctx.parents,
        "config": ctx.spec.model_dump(mode="json"),
        "data": ctx.data_hashes,
        "world_size": ctx.world_size,
        "instar_version": __version__,
        "metrics": final,
    }


def _read_sources(ctx: StageContext, kind) -> tuple[list[list[dict]], int]:
    specs = type(kind).data_specs(ctx.name, ctx.loaded.recipe.stages[ctx.name], ctx.loaded.recipe)
    row_model = ROW_FORMATS[kind.row_format]
    out, skipped = [], 0
    for path, spec in zip(ctx.data_paths, specs, strict=True):
        if spec.shards is not None:  # memmap token shards: opened, not read (the kind checks the tokenizer)
            from instar.data.shards import TokenShards

            out.append(TokenShards(path, spec.max_rows))
            continue
        rows = read_rows(path, row_model, spec.on_bad_row, spec.max_rows)
        if rows.skipped:
            say(f"[{ctx.name}] skipped {rows.skipped} bad rows in {path} (first: {rows.first_skip})",
                ctx.quiet or ctx.rank != 0)
        skipped += rows.skipped
        out.append(rows.rows)
    return out, skipped


def _resume_point(ctx: StageContext, layout):
    """The checkpoint to resume from, and whether it can be loaded exactly (same engine and world
    size) or only as consolidated weights with a fresh optimizer."""
    found = latest_checkpoint(ctx.stage_dir / "checkpoints", ctx.checkpoint_key)
    if found is None:
        return None, None, False
    path, state = found
    if state["global_batch_size"] != layout.global_batch_size:
        raise ContractError(
            f"stage '{ctx.name}' has a checkpoint at step {state['step']} made with a global batch of "
            f"{state['global_batch_size']} rows ({state['world_size']} ranks); this run would use "
            f"{layout.global_batch_size}. Set stages.{ctx.name}.train.global_batch_size="
            f"{state['global_batch_size']} to resume on {ctx.world_size} rank(s) with accumulation adjusted, "
            f"or delete {path.parent} to start the stage over")
    same = (state["engine"], state["world_size"], state.get("zero_stage")) == (
        ctx.spec.distributed.engine, ctx.world_size, ctx.spec.distributed.zero_stage)
    return path, state, same


def train_stage(ctx: StageContext, kind) -> dict[str, Any]:
    spec, train = ctx.spec, ctx.spec.train
    main = ctx.rank == 0
    quiet = ctx.quiet or not main
    layout = batch_layout(train, ctx.world_size, ctx.name)
    check_available(spec.logging, ctx.name)
    tokenizer = stage_tokenizer(ctx, kind.needs_chat_template)
    model = stage_model(ctx, tokenizer, kind.causal_lm_loss)
    # Counted before the engine: ZeRO-3 partitions the parameters (their numel drops to 0).
    on_gpu = spec.distributed.device != "cpu" and torch.cuda.is_available()
    mfu = MfuMeter(model, train.seq_len, ctx.world_size, spec.precision == "fp8",
                   cuda_device_name() if on_gpu else None)
    if mfu.note:
        say(f"[{ctx.name}] {mfu.note}", quiet)
    rows, skipped_rows = _read_sources(ctx, kind)
    sources, weights = kind.build_sources(tokenizer, rows)
    samplers = [EpochSampler(len(s), seed=ctx.seed + i) for i, s in enumerate(sources)]
    batcher = Batcher(sources, MixtureSampler(samplers, weights, seed=ctx.seed), train.seq_len,
                      train.packing and kind.packs_rows, tokenizer.pad_token_id)
    ckpt_root = ctx.stage_dir / "checkpoints"
    resume_path, resume_state, exact = _resume_point(ctx, layout)
    if resume_path is not None and not exact:
        # Another world size or engine: DeepSpeed's partitions do not fit, so consolidate the
        # weights and restart Adam's moments. The data stream and schedule continue exactly (they
        # depend on the global batch only), so the loss picks up where it was.
        load_weights(model, engine_class(resume_state["engine"]).consolidated_weights(resume_path),
                     f"the consolidated weights of checkpoint {resume_path}")
    engine = build_engine(model, spec, layout, ctx.name)
    engine.model.train()
    if select_attention(engine.model, engine.device, spec.precision) == FLASH:
        say(f"[{ctx.name}] attention: flash-attn varlen (packed documents split by position ids)", quiet)
    evaluator = Evaluator(ctx.spec.eval, tokenizer, ctx.loaded.base_dir, ctx.run_dir)
    metrics_log = JsonlLog(ctx.stage_dir / "metrics.jsonl")
    eval_log = JsonlLog(ctx.stage_dir / "eval.jsonl")

    step, tokens, bad_in_row, skipped_steps = 0, 0, 0, 0
    if resume_path is not None:
        if exact:
            engine.load(resume_path)
            load_rng(resume_path, ctx.rank)
            load_fp8_histories(resume_path, engine)
            kind_state = load_kind_state(resume_path, ctx.rank)
            if kind_state is not None:
                kind.load_state_dict(kind_state)
        batcher.load_state_dict(resume_state["batcher"])
        step, tokens = resume_state["step"], resume_state["tokens"]
        bad_in_row, skipped_steps = resume_state["bad_in_row"], resume_state["skipped_steps"]
        if main:
            metrics_log.rewind_to(step)
            eval_log.rewind_to(step)
        how = "" if exact else (f" on {ctx.world_size} rank(s) instead of {resume_state['world_size']}: "
                                f"weights consolidated, optimizer moments restarted")
        say(f"[{ctx.name}] resuming from {resume_path.name} (step {step}/{train.steps}){how}", quiet)
    else:
        if main:  # checkpoints of an earlier config of this stage can never be resumed
            remove_tree(ckpt_root)
            metrics_log.reset()
            eval_log.reset()
        torch.manual_seed(ctx.seed)
    engine.barrier()
    mirrors = MetricMirrors(spec.logging, ctx.run_dir, ctx.name, main=main,
                            resume_step=step if resume_path is not None else None,
                            config=spec.model_dump(mode="json"), fingerprint=ctx.fingerprint)

    per_rank = layout.micro_batch_size * layout.grad_accum
    kind.on_train_start(step)
    fp8_check = Fp8GemmCheck(spec.precision == "fp8", ctx.name)  # fails a step that ran no FP8 GEMM
    progress = StageProgress(ctx.name, train.steps, start=step, every=train.log_every, quiet=quiet)
    recent_losses: list[float] = []
    t_start = time.perf_counter()
    try:
        while step < train.steps:
            t0 = time.perf_counter()
            rows_all = batcher.next_rows(layout.global_batch_size) if kind.needs_rows(step) else []
            mine = rows_all[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
            work = kind.step_batches(engine, batcher, rows_all, mine, layout, step)
            data_s = time.perf_counter() - t0 - work.generate_seconds
            n_tokens = work.tokens
            lr = lr_at(step, train.steps, train.lr, train.warmup_ratio, train.min_lr_ratio)
            sums = StepMetrics()
            for batch in work.batches:
                batch = to_device(batch, engine.device)
                with engine.autocast():
                    loss, m = kind.loss(engine.model, batch, work.denominator)
                engine.backward(loss)
                sums.add(loss, m)
            loss_total, extra = sums.reduce(engine)  # means over the whole step, every rank
            extra.update(work.metrics)
            grad_norm, applied = engine.step(lr, allow=math.isfinite(loss_total))
            extra.update(fp8_check.step_metrics())
            extra.update(engine.step_metrics())
            bad_in_row = 0 if applied else bad_in_row + 1
            skipped_steps += 0 if applied else 1
            step += 1
            tokens += n_tokens
            dt = time.perf_counter() - t0
            if main:
                record = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                          "tokens_per_s": n_tokens / dt, "skipped": not applied, "data_share": data_s / dt,
                          "peak_mem_mb": peak_memory_mb(), **mfu.step_metrics(n_tokens, dt), **extra}
                metrics_log.write(record)
                mirrors.write(record)
            if bad_in_row >= train.max_bad_steps:
                raise TrainingError(f"stage '{ctx.name}': {bad_in_row} optimizer steps in a row had a non-finite "
                                    f"loss or gradient (last at step {step}); lower stages.{ctx.name}.train.lr "
                                    f"or check the data. Checkpoints made so far are kept")
            if applied:
                recent_losses = (recent_losses + [loss_total])[-train.log_every:]
            progress.update(step, {"loss": loss_total, "lr": lr, "tok/s": n_tokens / dt})
            if spec.eval.every and step % spec.eval.every == 0 and step < train.steps and evaluator.enabled:
                full = engine.export_model()
                if main:
                    with engine.hooks_lifted():
                        result = evaluator(full, step)
                    eval_log.write(result)
                    mirrors.write(result)
                engine.barrier()
            stop = step < train.steps and stop_requested(engine)  # preemption: all ranks agree
            if (train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps) or stop:
                save_checkpoint(ckpt_root, step, engine, {
                    "key": ctx.checkpoint_key, "batcher": batcher.state_dict(), "tokens": tokens,
                    "bad_in_row": bad_in_row, "skipped_steps": skipped_steps,
                    "global_batch_size": layout.global_batch_size, "world_size": ctx.world_size,
                    "engine": engine.name, "zero_stage": spec.distributed.zero_stage,
                }, keep=train.keep_checkpoints, kind_state=kind.state_dict())
            if stop:
                raise Preempted(f"stage '{ctx.name}': stopped at step {step} on {signal_name()}, checkpoint saved")
    except BaseException:
        mirrors.close()  # flush what was mirrored before the failure or preemption
        raise
    finally:
        progress.close()

    if bad_in_row:  # the same on every rank: the weights after a skipped step are not trusted
        raise TrainingError(f"stage '{ctx.name}': its last {bad_in_row} optimizer step(s) had a non-finite loss or "
                            f"gradient and were skipped, so it is not marked done; lower stages.{ctx.name}.train.lr "
                            f"or check the data. Checkpoints made so far are kept")
    full = engine.export_model()
    final: dict[str, Any] = {}
    if main:
        with engine.hooks_lifted():
            final_eval = evaluator(full, step) if evaluator.enabled else {}
        if final_eval:
            eval_log.write(final_eval)
            mirrors.write(final_eval)
        mirrors.close()
        final = {
            "steps": step,
            "tokens": tokens,
            "loss": sum(recent_losses) / len(recent_losses) if recent_losses else float("nan"),
            "skipped_steps": skipped_steps,
            "skipped_rows": skipped_rows,
            "truncated_examples": batcher.truncated,
            "global_batch_size": layout.global_batch_size,
            "train_seconds": round(time.perf_counter() - t_start, 2),
            **{k: v for k, v in final_eval.items() if k.startswith("exact_match/")},
        }
        if not math.isfinite(final["loss"]):
            raise TrainingError(f"stage '{ctx.name}': its final loss is {final['loss']}; lower "
                                f"stages.{ctx.name}.train.lr or check the data")
        write_artifact(ctx.model_dir, full, tokenizer, artifact_meta(ctx, final))
    engine.barrier()
    return final
