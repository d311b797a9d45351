"""Input transforms: change a training micro-batch's *inputs* after collation, never its targets.

A stage lists them in `transforms: [{name: ..., ...}]`; each is applied in order to every training
micro-batch (not to eval). Targets, and so the loss denominator counted on the step's rows, stay
as they are. Randomness is drawn per global row from (stage seed, step, row), so a transform does
the same on one process and on N ranks, and after a resume.

Adding one = a module with a `TransformSpec` subclass and an `InputTransform` subclass, and one
line in `_REGISTRY`. Entries are import strings; the modules import torch only inside methods, so
a recipe is checked without it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from instar.config.schema import Strict
from instar.registry import Registry

if TYPE_CHECKING:
    from instar.data.batch import Batch


class TransformSpec(Strict):
    name: str


class InputTransform(ABC):
    Spec: type[TransformSpec] = TransformSpec

    def __init__(self, spec: TransformSpec, tokenizer, seed: int, total_steps: int):
        self.spec, self.tokenizer, self.seed, self.total_steps = spec, tokenizer, seed, total_steps

    @abstractmethod
    def __call__(self, batch: "Batch", step: int, first_row: int) -> "Batch":
        """The batch with its inputs changed; `first_row` is the global index (over all ranks) of
        the batch's first row in the step, for per-row seeds."""


_REGISTRY: Registry[str] = Registry("input transform")
_REGISTRY.register("mask_inputs")("instar.methods.input_transforms.mask_inputs:MaskInputs")


def transform_class(name: str) -> type[InputTransform]:
    module, _, cls = _REGISTRY[_REGISTRY.validate(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def parse_transforms(items: Any) -> list[TransformSpec]:
    """A stage's `transforms` list as the registered spec of each (pydantic `before` validator)."""
    if not isinstance(items, list):
        raise ValueError("`transforms` is a list of {name: ..., <settings>}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, TransformSpec):
            out.append(item)
            continue
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"transforms[{i}]: give a mapping with `name` (one of: {', '.join(_REGISTRY.names())})")
        spec_cls = transform_class(str(item["name"])).Spec
        try:
            out.append(spec_cls.model_validate(item))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", list)())
            raise ValueError(f"transforms[{i}] ({item['name']}): {details or exc}") from None
    return out


def build_transforms(specs: list[TransformSpec], tokenizer, seed: int, total_steps: int) -> list[InputTransform]:
    return [transform_class(s.name)(s, tokenizer, seed + i, total_steps) for i, s in enumerate(specs)]
