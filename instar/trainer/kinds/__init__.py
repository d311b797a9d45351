"""The runtime classes of stage kinds, by name (the registry itself is instar.kinds)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from instar.kinds import kind_names, runtime_path  # noqa: F401  (kind_names: re-exported for callers)

if TYPE_CHECKING:
    from instar.trainer.kinds.base import StageKind


def get_kind(name: str) -> "type[StageKind]":
    """The class that runs a stage of kind `name` (imports the trainer; planning uses
    instar.kinds.definition instead)."""
    module_name, _, cls_name = runtime_path(name).partition(":")
    return getattr(importlib.import_module(module_name), cls_name)
