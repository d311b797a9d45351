"""`pretrain`: next-token prediction on `{"text"}` documents (or token shards)."""

from __future__ import annotations

from instar.config.schema import StageSpec
from instar.kinds.base import KindDefinition


class PretrainDefinition(KindDefinition):
    name = "pretrain"
    Spec = StageSpec  # no settings beyond the common ones
    row_format = "text"
