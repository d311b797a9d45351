"""Ancestry in a recipe's stage graph (edges from `after:`): what planning checks and merges ask,
with no import of the graph package (the config layer sits below it)."""

from __future__ import annotations


def ancestors(stages: dict, name: str) -> set[str]:
    """Every stage `name` depends on, directly or not (cycles tolerated)."""
    seen: set[str] = set()
    todo = list(getattr(stages.get(name), "after", []) or [])
    while todo:
        parent = todo.pop()
        if parent in seen or parent not in stages:
            continue
        seen.add(parent)
        todo.extend(stages[parent].after)
    return seen
