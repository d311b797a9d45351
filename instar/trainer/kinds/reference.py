"""The frozen reference model of dpo and grpo stages: the first parent by default, or any
ancestor named by `reference`."""

from __future__ import annotations

from instar.errors import ContractError


def reference_stage(ctx) -> str:
    return ctx.spec.reference or ctx.parents[0]


def load_reference_model(ctx, tokenizer, engine):
    """The reference stage's weights, frozen, held as `engine` holds the policy (see
    instar.trainer.frozen); its vocabulary must be the stage's (log-probs of different token ids
    cannot be compared). Rank 0 records what each rank holds in `<stage>/reference.json`."""
    from transformers import AutoTokenizer

    from instar.models.build import load_pretrained
    from instar.trainer.frozen import freeze
    from instar.trainer.setup import same_vocabulary

    stage = reference_stage(ctx)
    model_dir = ctx.parent_model_dir(stage)
    if not same_vocabulary(AutoTokenizer.from_pretrained(model_dir, local_files_only=True), tokenizer):
        raise ContractError(f"stage '{ctx.name}': reference stage '{stage}' uses another tokenizer; the "
                            f"reference must share the policy's vocabulary. Name another stage in "
                            f"stages.{ctx.name}.reference")
    model = freeze(load_pretrained(model_dir), engine, ctx.spec.precision)
    _record(ctx, engine, stage, model)
    return model


def _record(ctx, engine, stage: str, model) -> None:
    import json

    from instar.trainer.frozen import bytes_held
    from instar.trainer.split_work import gather_objects

    held = gather_objects(bytes_held(model), ctx.world_size)
    if ctx.rank == 0:
        record = {"reference": stage, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "zero_stage": getattr(engine, "zero_stage", None), "bytes_per_rank": held}
        (ctx.stage_dir / "reference.json").write_text(json.dumps(record) + "\n")
