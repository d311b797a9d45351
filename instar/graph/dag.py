"""The stage DAG: parents from `after:`, validation, topological order, ancestry."""

from __future__ import annotations

import difflib

from instar.config.schema import Recipe
from instar.errors import RecipeError


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


def _find_cycle(stages: dict) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for parent in stages[node].after:
            if parent not in stages:
                continue
            if color.get(parent) == 1:
                return stack[stack.index(parent):] + [parent]
            if color.get(parent) is None:
                found = visit(parent)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in stages:
        if color.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


class StageGraph:
    """Validated DAG of a recipe's stages. Fan-out and fan-in are both allowed."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.stages = recipe.stages
        self._validate()

    def parents(self, name: str) -> list[str]:
        return list(self.stages[name].after)

    def children(self, name: str) -> list[str]:
        return [s for s, spec in self.stages.items() if name in spec.after]

    def topo_order(self) -> list[str]:
        """Parents before children; among ready stages, recipe order."""
        done: list[str] = []
        remaining = list(self.stages)
        while remaining:
            ready = next(s for s in remaining if all(p in done for p in self.stages[s].after))
            done.append(ready)
            remaining.remove(ready)
        return done

    def descendants(self, name: str) -> set[str]:
        return {s for s in self.stages if name in ancestors(self.stages, s)}

    def _validate(self) -> None:
        from instar.config.resolve import resolve_stage
        from instar.trainer.kinds import get_kind

        errors: list[str] = []
        names = list(self.stages)
        for name, spec in self.stages.items():
            if len(set(spec.after)) != len(spec.after):
                errors.append(f"stages.{name}.after: lists a parent twice: {spec.after}")
            for parent in spec.after:
                if parent == name:
                    errors.append(f"stages.{name}.after: a stage cannot come after itself")
                elif parent not in self.stages:
                    close = difflib.get_close_matches(parent, names, n=1, cutoff=0.5)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    errors.append(f"stages.{name}.after: parent '{parent}' is not a stage of this recipe{hint} "
                                  f"(stages: {', '.join(names)})")
            kind = get_kind(spec.kind)
            n = len(spec.after)
            if n < kind.min_parents or (kind.max_parents is not None and n > kind.max_parents):
                want = (f"at least {kind.min_parents}" if kind.max_parents is None
                        else f"{kind.min_parents}" if kind.min_parents == kind.max_parents
                        else f"{kind.min_parents} to {kind.max_parents}")
                errors.append(f"stages.{name}.after: a {spec.kind} stage takes {want} parent(s), got {n}")
            # Checked as the stage will run: its own settings over `defaults`.
            errors.extend(kind.check(name, resolve_stage(self.recipe, name), self.recipe))
        cycle = _find_cycle(self.stages)
        if cycle:
            # after: edges point child -> parent; print the cycle in execution order.
            errors.append("the stages form a cycle: " + " -> ".join(reversed(cycle)))
        if errors:
            raise RecipeError("invalid stage graph:\n  " + "\n  ".join(errors))
