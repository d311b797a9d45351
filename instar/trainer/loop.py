"""The one training loop every training kind runs, on one process or many ranks.

The kind supplies examples and a loss; the loop does batching, accumulation, clipping, the
learning-rate schedule, the non-finite guard, eval and checkpoint cadence, metrics, resume,
and the artifact at the end. Rank 0 alone prints, logs metrics, evaluates and writes the
artifact; every rank takes part in the collectives (steps, checkpoints, gathering weights).

In parts: `setup` builds what a stage runs with (`StageRun`), `train_step` is one optimizer step,
the `Checkpointer` owns resume and the checkpoint cadence over typed state, `PeriodicEval` is the
eval hook, and `finish_stage` (shared with merges) the epilogue; `train_stage` strings them together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from instar.console import StageProgress, say
from instar.config.precision import precision_policy
from instar.data.checks import small_data_note, unknown_characters_note
from instar.data.formats import ROW_FORMATS
from instar.data.jsonl import read_rows
from instar.data.packing import Batcher
from instar.data.sampler import EpochSampler, MixtureSampler
from instar.errors import TrainingError
from instar.eval.runner import Evaluator
from instar.models.attention import FLASH, select_attention
from instar.models.fp8 import Fp8GemmCheck
from instar.trainer.batch import BatchLayout, batch_layout
from instar.trainer.checkpointer import Checkpointer, LoopState, ResumePoint
from instar.trainer.context import StageContext
from instar.trainer.engine import Engine, build_engine, engine_class
from instar.trainer.finish import finish_stage
from instar.trainer.flops import MfuMeter, cuda_device_name
from instar.trainer.jsonl_log import JsonlLog
from instar.trainer.metric_mirrors import MetricMirrors, check_available
from instar.trainer.schedule import lr_at
from instar.trainer.setup import stage_model, stage_tokenizer
from instar.trainer.single_engine import load_weights
from instar.trainer.step_metrics import StepMetrics
from instar.trainer.stop import Preempted, signal_name, stop_requested


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def _data_notes(ctx: StageContext, layout: BatchLayout, tokenizer, rows: list, sources: list) -> list[str]:
    """What trains but likely not as meant: a source smaller than one global batch, characters
    the tokenizer cannot spell (token shards were encoded already: not scanned)."""
    from instar.data.shards import TokenShards

    shape = (f"micro_batch_size {layout.micro_batch_size} x grad_accum {layout.grad_accum} x "
             f"{layout.world_size} rank(s)")
    notes = []
    for path, raw, source in zip(ctx.data_paths, rows, sources):
        notes.append(small_data_note(path, len(source), layout.global_batch_size, shape))
        if not isinstance(raw, TokenShards):
            notes.append(unknown_characters_note(path, raw, tokenizer))
    return [f"[{ctx.name}] {note}" for note in notes if note]


@dataclass
class StageRun:
    """What one training stage runs with, built once by `setup` on every rank."""

    ctx: StageContext
    kind: Any  # the stage's TrainingKind
    layout: BatchLayout
    tokenizer: Any
    engine: Engine
    batcher: Batcher
    evaluator: Evaluator
    checkpointer: Checkpointer
    resume: ResumePoint | None
    mfu: MfuMeter
    metrics_log: JsonlLog
    eval_log: JsonlLog
    skipped_rows: int

    @property
    def main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def quiet(self) -> bool:
        return self.ctx.quiet or not self.main


def setup(ctx: StageContext, kind) -> StageRun:
    """Tokenizer, starting model (consolidated from a checkpoint of another topology where one is
    resumed), data stream and engine of a stage."""
    spec, train = ctx.spec, ctx.spec.train
    quiet = ctx.quiet or ctx.rank != 0
    layout = batch_layout(train, ctx.world_size, ctx.name)
    check_available(spec.logging, ctx.name)
    tokenizer = stage_tokenizer(ctx, kind.needs_chat_template)
    model = stage_model(ctx, tokenizer, kind.causal_lm_loss)
    # Counted before the engine: ZeRO-3 partitions the parameters (their numel drops to 0).
    on_gpu = spec.distributed.device != "cpu" and torch.cuda.is_available()
    mfu = MfuMeter(model, train.seq_len, ctx.world_size, precision_policy(spec.precision).fp8,
                   cuda_device_name() if on_gpu else None)
    if mfu.note:
        say(f"[{ctx.name}] {mfu.note}", quiet)
    rows, skipped_rows = _read_sources(ctx, kind)
    sources, weights = kind.build_sources(tokenizer, rows)
    for note in [] if quiet else _data_notes(ctx, layout, tokenizer, rows, sources):
        say(note)
    samplers = [EpochSampler(len(s), seed=ctx.seed + i) for i, s in enumerate(sources)]
    batcher = Batcher(sources, MixtureSampler(samplers, weights, seed=ctx.seed), train.seq_len,
                      train.packing and kind.packs_rows, tokenizer.pad_token_id)
    checkpointer = Checkpointer(ctx, layout)
    resume = checkpointer.find()
    if resume is not None and not resume.exact:
        # Another world size or engine: DeepSpeed's partitions do not fit, so consolidate the
        # weights and restart Adam's moments. The data stream and schedule continue exactly (they
        # depend on the global batch only), so the loss picks up where it was.
        load_weights(model, engine_class(resume.engine).consolidated_weights(resume.path),
                     f"the consolidated weights of checkpoint {resume.path}")
    engine = build_engine(model, spec, layout, ctx.name)
    engine.model.train()
    if select_attention(engine.model, engine.device, spec.precision) == FLASH:
        say(f"[{ctx.name}] attention: flash-attn varlen (packed documents split by position ids)", quiet)
    evaluator = Evaluator(spec.eval, tokenizer, ctx.loaded.base_dir, ctx.run_dir)
    return StageRun(ctx, kind, layout, tokenizer, engine, batcher, evaluator, checkpointer, resume, mfu,
                    JsonlLog(ctx.stage_dir / "metrics.jsonl"), JsonlLog(ctx.stage_dir / "eval.jsonl"), skipped_rows)


def start(run: StageRun) -> LoopState:
    """The state the loop starts from: the resume point's (logs rewound to it), or a fresh start
    (old checkpoints and logs removed, the global RNG seeded). Every rank calls."""
    ctx, train = run.ctx, run.ctx.spec.train
    if run.resume is not None:
        state = run.checkpointer.restore(run.resume, run.engine, run.kind, run.batcher)
        if run.main:
            run.metrics_log.rewind_to(state.step)
            run.eval_log.rewind_to(state.step)
        how = "" if run.resume.exact else (f" on {ctx.world_size} rank(s) instead of {run.resume.world_size}: "
                                           f"weights consolidated, optimizer moments restarted")
        say(f"[{ctx.name}] resuming from {run.resume.path.name} (step {state.step}/{train.steps}){how}", run.quiet)
    else:
        state = LoopState()
        if run.main:
            run.checkpointer.discard()
            run.metrics_log.reset()
            run.eval_log.reset()
        torch.manual_seed(ctx.seed)
    run.engine.barrier()
    return state


@dataclass
class StepResult:
    loss: float  # the step's loss over every micro-batch and rank
    lr: float
    grad_norm: float
    applied: bool  # False: a non-finite loss or gradient, the update was skipped
    tokens: int  # trained on, every rank
    seconds: float
    data_seconds: float  # drawing and batching rows (sampling excluded)
    metrics: dict[str, float] = field(default_factory=dict)  # the kind's and the engine's


def train_step(run: StageRun, step: int) -> StepResult:
    """One optimizer step on every rank: the step's rows, the kind's micro-batches, forward and
    backward of each, the update at the scheduled learning rate."""
    ctx, kind, engine, layout, train = run.ctx, run.kind, run.engine, run.layout, run.ctx.spec.train
    t0 = time.perf_counter()
    per_rank = layout.micro_batch_size * layout.grad_accum
    rows_all = run.batcher.next_rows(layout.global_batch_size) if kind.needs_rows(step) else []
    mine = rows_all[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    work = kind.step_batches(engine, run.batcher, rows_all, mine, layout, step)
    data_seconds = time.perf_counter() - t0 - work.generate_seconds
    lr = lr_at(step, train.steps, train.lr, train.warmup_ratio, train.min_lr_ratio)
    sums = StepMetrics()
    for batch in work.batches:
        batch = batch.to(engine.device)
        with engine.autocast():
            loss, metrics = kind.loss(engine.model, batch, work.denominator)
        engine.backward(loss)
        sums.add(loss, metrics)
    loss_total, metrics = sums.reduce(engine)  # means over the whole step, every rank
    metrics.update(work.metrics)
    grad_norm, applied = engine.step(lr, allow=math.isfinite(loss_total))
    metrics.update(engine.step_metrics())
    return StepResult(loss_total, lr, grad_norm, applied, work.tokens, time.perf_counter() - t0, data_seconds,
                      metrics)


class PeriodicEval:
    """The eval hook: every `eval.every` steps (not after the last, which the epilogue evaluates),
    the whole model on rank 0; every rank takes part in gathering it."""

    def __init__(self, run: StageRun, mirrors: MetricMirrors):
        self.run, self.mirrors = run, mirrors
        self.every = run.ctx.spec.eval.every if run.evaluator.enabled else 0

    def __call__(self, step: int) -> None:
        run = self.run
        if not self.every or step % self.every or step >= run.ctx.spec.train.steps:
            return
        full = run.engine.export_model()
        if run.main:
            with run.engine.hooks_lifted():
                result = run.evaluator(full, step)
            run.eval_log.write(result)
            self.mirrors.write(result)
        run.engine.barrier()


def train_stage(ctx: StageContext, kind) -> dict[str, Any]:
    run = setup(ctx, kind)
    spec, train = ctx.spec, ctx.spec.train
    state = start(run)
    mirrors = MetricMirrors(spec.logging, ctx.run_dir, ctx.name, main=run.main,
                            resume_step=state.step if run.resume is not None else None,
                            config=spec.model_dump(mode="json"), fingerprint=ctx.fingerprint)
    evaluate = PeriodicEval(run, mirrors)
    kind.on_train_start(state.step)
    fp8_check = Fp8GemmCheck(precision_policy(spec.precision).fp8, ctx.name)  # fails a step that ran no FP8 GEMM
    progress = StageProgress(ctx.name, train.steps, start=state.step, every=train.log_every, quiet=run.quiet)
    recent_losses: list[float] = []
    t_start = time.perf_counter()
    try:
        while state.step < train.steps:
            result = train_step(run, state.step)
            result.metrics.update(fp8_check.step_metrics())
            state.bad_in_row = 0 if result.applied else state.bad_in_row + 1
            state.skipped_steps += 0 if result.applied else 1
            state.step += 1
            state.tokens += result.tokens
            if run.main:
                record = {"step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                          "tokens": state.tokens, "tokens_per_s": result.tokens / result.seconds,
                          "skipped": not result.applied, "data_share": result.data_seconds / result.seconds,
                          "peak_mem_mb": peak_memory_mb(), **run.mfu.step_metrics(result.tokens, result.seconds),
                          **result.metrics}
                run.metrics_log.write(record)
                mirrors.write(record)
            if state.bad_in_row >= train.max_bad_steps:
                raise TrainingError(f"stage '{ctx.name}': {state.bad_in_row} optimizer steps in a row had a "
                                    f"non-finite loss or gradient (last at step {state.step}); lower "
                                    f"stages.{ctx.name}.train.lr or check the data. Checkpoints made so far are kept")
            if result.applied:
                recent_losses = (recent_losses + [result.loss])[-train.log_every:]
            progress.update(state.step, {"loss": result.loss, "lr": result.lr,
                                         "tok/s": result.tokens / result.seconds})
            evaluate(state.step)
            stop = state.step < train.steps and stop_requested(run.engine)  # preemption: all ranks agree
            if run.checkpointer.due(state.step, stop):
                run.checkpointer.save(state, run.engine, kind, run.batcher)
            if stop:
                raise Preempted(f"stage '{ctx.name}': stopped at step {state.step} on {signal_name()}, "
                                f"checkpoint saved")
    except BaseException:
        mirrors.close()  # flush what was mirrored before the failure or preemption
        raise
    finally:
        progress.close()
    return _finish(run, state, recent_losses, mirrors, time.perf_counter() - t_start)


def _finish(run: StageRun, state: LoopState, recent_losses: list[float], mirrors: MetricMirrors,
            seconds: float) -> dict[str, Any]:
    """A stage that ended on a good step: the whole model, its final eval and artifact (rank 0)."""
    ctx = run.ctx
    if state.bad_in_row:  # the same on every rank: the weights after a skipped step are not trusted
        raise TrainingError(f"stage '{ctx.name}': its last {state.bad_in_row} optimizer step(s) had a non-finite "
                            f"loss or gradient and were skipped, so it is not marked done; lower "
                            f"stages.{ctx.name}.train.lr or check the data. Checkpoints made so far are kept")
    full = run.engine.export_model()
    final: dict[str, Any] = {}
    if run.main:
        final = {
            "steps": state.step,
            "tokens": state.tokens,
            "loss": sum(recent_losses) / len(recent_losses) if recent_losses else float("nan"),
            "skipped_steps": state.skipped_steps,
            "skipped_rows": run.skipped_rows,
            "truncated_examples": run.batcher.truncated,
            "global_batch_size": run.layout.global_batch_size,
            "train_seconds": round(seconds, 2),
        }
        try:
            if not math.isfinite(final["loss"]):
                raise TrainingError(f"stage '{ctx.name}': its final loss is {final['loss']}; lower "
                                    f"stages.{ctx.name}.train.lr or check the data")
            with run.engine.hooks_lifted():
                finish_stage(ctx, full, run.tokenizer, final, run.evaluator, state.step, run.eval_log, mirrors)
        finally:
            mirrors.close()
    run.engine.barrier()
    return final
