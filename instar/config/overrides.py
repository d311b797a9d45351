"""Dot-list overrides from the command line: `stages.sft.train.lr=1e-5`."""

from __future__ import annotations

from typing import Any

import yaml

from instar.errors import RecipeError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"bad override {text!r}: write it as dotted.key=value, e.g. stages.sft.train.lr=1e-5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"bad override {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each override in the raw recipe mapping (in place); returns the paths it set."""
    touched: set[tuple[str, ...]] = set()
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise RecipeError(f"bad override {text!r}: {where} is a {type(child).__name__}, not a mapping")
            node = child
        node[path[-1]] = value
        touched.add(tuple(path))
    return touched
