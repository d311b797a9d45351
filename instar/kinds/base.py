"""A stage kind as the recipe and the graph see it: its settings (`Spec`), what it reads, how many
parents it takes, what it declares about itself, and the checks the schema cannot make. No torch
and no trainer here: config and graph read these; the runtime class in instar.trainer.kinds
subclasses the definition and adds how the stage runs."""

from __future__ import annotations

from typing import ClassVar

from instar.config.schema import DataSpec, Recipe, StageSpec


def setting_path(recipe: Recipe, stage: str, section: str, field: str) -> str:
    """Where the value a resolved stage has for `section.field` was written: the stage's own
    settings or `defaults` (for messages about values a stage inherits)."""
    own = getattr(recipe.stages[stage], section, None)
    if own is not None and field in own.model_fields_set:
        return f"stages.{stage}.{section}.{field}"
    return f"defaults.{section}.{field}"


class KindDefinition:
    name: ClassVar[str]
    Spec: ClassVar[type[StageSpec]] = StageSpec
    min_parents: ClassVar[int] = 0
    max_parents: ClassVar[int | None] = 1
    row_format: ClassVar[str | None] = "text"  # key of instar.data.formats.ROW_FORMATS; None: reads no data
    needs_chat_template: ClassVar[bool] = False
    packs_rows: ClassVar[bool] = True  # whether `train.packing` may put several examples in a row
    causal_lm_loss: ClassVar[bool] = True  # its loss is next-token cross-entropy (fused_ce can compute it)
    uses_reference: ClassVar[bool] = False  # reads a frozen reference model (`reference:` names an ancestor)

    @classmethod
    def data_specs(cls, name: str, spec: StageSpec, recipe: Recipe) -> list[DataSpec]:
        """The data this stage reads, in order (hashed into its fingerprint, validated up front)."""
        return [spec.data] if spec.data is not None else []

    @classmethod
    def check(cls, name: str, spec: StageSpec, recipe: Recipe) -> list[str]:
        """Problems with this stage's settings that the schema cannot see; `spec` is resolved
        (the stage's own settings over `defaults`), as the stage will run."""
        if cls.row_format is not None and spec.data is None:
            return [f"stages.{name}.data: a {cls.name} stage needs `data` (a `path` to JSONL rows or `generate`)"]
        if spec.data is not None and spec.data.shards is not None and cls.row_format != "text":
            return [f"stages.{name}.data.shards: token shards hold pretraining text; a {cls.name} stage reads "
                    f"{cls.row_format} rows: give `path` to a JSONL file"]
        return []


def check_reference(name: str, reference: str | None, recipe: Recipe) -> list[str]:
    """Problems with a stage's `reference` setting (found at validate time)."""
    from instar.config.ancestry import ancestors

    if reference is None:
        return []
    if reference not in recipe.stages:
        return [f"stages.{name}.reference: '{reference}' is not a stage of this recipe"]
    if reference not in ancestors(recipe.stages, name):
        return [f"stages.{name}.reference: '{reference}' is not an ancestor of '{name}'; "
                f"the reference must finish before this stage starts (add it to `after`)"]
    return []
