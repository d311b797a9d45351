"""The stage DAG: parents from `after:`, validation, topological order, ancestry."""

from __future__ import annotations

import difflib
import heapq

from instar.config.schema import Recipe
from instar.errors import RecipeError


def _find_cycle(stages: dict) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Iterative: a chain of thousands of stages
    would pass Python's recursion limit."""
    color: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in stages:
        if root in color:
            continue
        color[root] = 1
        path, todo = [root], [iter(stages[root].after)]
        while todo:
            parent = next((p for p in todo[-1] if p in stages and color.get(p) != 2), None)
            if parent is None:
                color[path.pop()] = 2
                todo.pop()
            elif color.get(parent) == 1:
                return path[path.index(parent):] + [parent]
            else:
                color[parent] = 1
                path.append(parent)
                todo.append(iter(stages[parent].after))
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
        """Parents before children; among ready stages, recipe order (Kahn's algorithm, linear)."""
        names = list(self.stages)
        index = {name: i for i, name in enumerate(names)}
        waiting = {name: len(set(spec.after)) for name, spec in self.stages.items()}
        kids: dict[str, list[str]] = {name: [] for name in self.stages}
        for name, spec in self.stages.items():
            for parent in set(spec.after):
                kids[parent].append(name)
        ready = [index[name] for name, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        done: list[str] = []
        while ready:
            name = names[heapq.heappop(ready)]
            done.append(name)
            for kid in kids[name]:
                waiting[kid] -= 1
                if waiting[kid] == 0:
                    heapq.heappush(ready, index[kid])
        return done

    def descendants(self, name: str) -> set[str]:
        """Every stage that depends on `name`, directly or not (one pass over the edges)."""
        kids: dict[str, list[str]] = {}
        for stage, spec in self.stages.items():
            for parent in spec.after:
                kids.setdefault(parent, []).append(stage)
        seen: set[str] = set()
        todo = list(kids.get(name, []))
        while todo:
            stage = todo.pop()
            if stage not in seen:
                seen.add(stage)
                todo.extend(kids.get(stage, []))
        return seen

    def _validate(self) -> None:
        from instar.config.resolve import resolve_stage
        from instar.kinds import definition

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
            kind = definition(spec.kind)
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
