"""Resolve a stage: its own settings over the recipe's `defaults`, deep-merged field by field."""

from __future__ import annotations

from typing import Any

from instar.config.schema import Recipe, StageSpec

INHERITED = ("train", "eval", "optimizer", "precision", "fp8", "kernels", "distributed", "logging")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_stage(recipe: Recipe, name: str) -> StageSpec:
    """The stage's spec with every inherited section filled in from `defaults`.

    Only the fields a stage sets itself override the defaults (pydantic's `exclude_unset`),
    so `stages.sft.train.lr` alone keeps every other `defaults.train` value.
    """
    spec = recipe.stages[name]
    merged = spec.model_dump(exclude_unset=True)
    for section in INHERITED:
        default = getattr(recipe.defaults, section)
        own = getattr(spec, section)
        if isinstance(default, str):
            merged[section] = own if own is not None else default
            continue
        own_dict = own.model_dump(exclude_unset=True) if own is not None else {}
        merged[section] = deep_merge(default.model_dump(exclude_unset=False), own_dict)
    return type(spec).model_validate(merged)
