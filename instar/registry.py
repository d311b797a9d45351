"""Named registries for the things a recipe picks by name (DPO losses, GRPO loss types, advantage
estimators, rewards). Adding one is a decorated function; the recipe's name is checked when it
loads, with the closest registered name as a hint. No torch here: the config layer reads it."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what  # e.g. "DPO loss", for messages
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def problem(self, name: str) -> str | None:
        """Why `name` is not registered (with the closest name), or None when it is."""
        if name in self._entries:
            return None
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.what} '{name}'{hint} (one of: {', '.join(self.names())})"

    def validate(self, name: str) -> str:
        """`name` if registered, else ValueError (pydantic turns it into a field error)."""
        problem = self.problem(name)
        if problem:
            raise ValueError(problem)
        return name
