"""Check `model.config` against the HF config class it builds: HF keeps an unknown key (a typo such
as `hidden_sise`) as a plain attribute and builds a default-size model, so instar refuses it."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from pathlib import Path
from typing import Any


def _known_keys(cls) -> set[str]:
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    if dataclasses.is_dataclass(cls):
        known |= {f.name for f in dataclasses.fields(cls)}
    return known - {"self", "kwargs"}


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def non_finite_keys(config: dict[str, Any]) -> list[str]:
    """Keys of `model.config` holding a non-finite number (the schema's allow_inf_nan does not reach
    this free mapping). No HF import: checked whenever a recipe loads."""
    return [key for key, value in config.items() if not _finite(value)]


def check_model_config(config: dict[str, Any]) -> tuple[list[tuple[str, str]], int | None]:
    """(key, problem) for each key the config class ignores, and the model's max positions (None
    when unknown). A legacy key HF still maps onto a field (rope_theta -> rope_parameters) is kept."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in config.items() if k != "model_type"}
    try:
        default = AutoConfig.for_model(config["model_type"])
    except (ValueError, KeyError) as exc:  # an unknown model_type
        return [("model_type", str(exc).splitlines()[0])], None
    cls = type(default)
    known = _known_keys(cls)
    problems = []
    for key, value in cfg.items():
        if key in known or not _finite(value):  # non-finite values: refused by load_recipe
            continue
        try:
            alone = AutoConfig.for_model(config["model_type"], **{key: value}).to_dict()
        except (ValueError, TypeError):
            continue  # a value HF rejects: reported when the model is built
        if key in alone:  # kept as a plain attribute, not consumed into a field
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append((key, f"not a field of {cls.__name__}, which ignores it{hint}"))
    try:
        positions = getattr(AutoConfig.for_model(config["model_type"], **cfg), "max_position_embeddings", None)
    except (ValueError, TypeError):
        positions = None
    return problems, positions


def model_dir_positions(path: Path) -> int | None:
    """max_position_embeddings from a local HF model folder's config.json, where it says."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    return value if isinstance(value, int) else None
