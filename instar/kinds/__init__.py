"""The registry of stage kinds. Adding a kind = its definition (settings, declared capabilities,
checks: instar/kinds/<kind>.py), its runtime (instar/trainer/kinds/<kind>.py) and one line here.

Entries are import strings: a definition imports neither torch nor the trainer, so loading and
validating a recipe never do; the runtime class is imported only to run a stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.kinds.base import KindDefinition

_REGISTRY: dict[str, tuple[str, str]] = {  # name -> (definition, runtime)
    "pretrain": ("instar.kinds.pretrain:PretrainDefinition", "instar.trainer.kinds.pretrain:PretrainKind"),
    "cpt": ("instar.kinds.cpt:CptDefinition", "instar.trainer.kinds.cpt:CptKind"),
    "sft": ("instar.kinds.sft:SftDefinition", "instar.trainer.kinds.sft:SftKind"),
    "dpo": ("instar.kinds.dpo:DpoDefinition", "instar.trainer.kinds.dpo:DpoKind"),
    "kto": ("instar.kinds.kto:KtoDefinition", "instar.trainer.kinds.kto:KtoKind"),
    "grpo": ("instar.kinds.grpo:GrpoDefinition", "instar.trainer.kinds.grpo:GrpoKind"),
    "merge": ("instar.kinds.merge:MergeDefinition", "instar.trainer.kinds.merge:MergeKind"),
}


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def kind_names() -> list[str]:
    return list(_REGISTRY)


def definition(name: str) -> "type[KindDefinition]":
    """The kind's definition (its Spec, capabilities and checks), without torch."""
    return _load(_REGISTRY[name][0])


def runtime_path(name: str) -> str:
    """The import string of the class that runs a stage of this kind (instar.trainer.kinds)."""
    return _REGISTRY[name][1]
