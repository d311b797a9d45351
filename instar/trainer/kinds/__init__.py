"""The registry of stage kinds. Adding a kind = one module + one line here.

Entries are import strings so that planning a recipe never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instar.trainer.kinds.base import StageKind

_REGISTRY: dict[str, str] = {
    "pretrain": "instar.trainer.kinds.pretrain:PretrainKind",
    "cpt": "instar.trainer.kinds.cpt:CptKind",
    "sft": "instar.trainer.kinds.sft:SftKind",
    "dpo": "instar.trainer.kinds.dpo:DpoKind",
    "kto": "instar.trainer.kinds.kto:KtoKind",
    "grpo": "instar.trainer.kinds.grpo:GrpoKind",
    "merge": "instar.trainer.kinds.merge:MergeKind",
}


def kind_names() -> list[str]:
    return list(_REGISTRY)


def get_kind(name: str) -> "type[StageKind]":
    module_name, _, cls_name = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)
