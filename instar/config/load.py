"""Load a recipe: YAML (with line numbers kept for errors) -> overrides -> typed models.

Every error names the file and line (or the override), the field path, and how to fix it;
an unknown key also names the closest valid key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from instar.config.overrides import apply_overrides
from instar.config.schema import Defaults, ModelConfig, Recipe, RunConfig, StageSpec
from instar.errors import RecipeError


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    raw: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        """Relative data and model paths in a recipe are resolved against its own folder."""
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir) / self.recipe.run.name


def _key_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            lines[key_path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key_path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, path + (i,)))
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with sections run, model, defaults, stages")
    return raw, _key_lines(node) if node is not None else {}


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (the parent of an unknown key), walking nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return []
        current = _model_in(info.annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_error(err: dict, prefix: tuple, model: type[BaseModel], path: Path,
                  lines: dict[tuple, int], overridden: set[tuple]) -> str:
    loc = prefix + tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    where = str(path)
    for depth in range(len(loc), 0, -1):
        if tuple(str(p) for p in loc[:depth]) in {tuple(str(q) for q in o) for o in overridden}:
            where = f"command-line override {'.'.join(str(p) for p in loc[:depth])}"
            break
        if loc[:depth] in lines:
            where = f"{path}:{lines[loc[:depth]]}"
            break
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(model, tuple(err["loc"][:-1]))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: {dotted}: unknown key{hint} (valid keys: {', '.join(valid)})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {dotted}: {msg}"


def _validate(model: type[BaseModel], data: Any, prefix: tuple, errors: list[str], path: Path,
              lines: dict[tuple, int], overridden: set[tuple]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(_format_error(e, prefix, model, path, lines, overridden) for e in exc.errors())
        return None


def _closest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe. Raises RecipeError listing every problem found."""
    from instar.trainer.kinds import get_kind, kind_names

    path = Path(path)
    overrides = list(overrides or [])
    raw, lines = read_yaml(path)
    overridden = apply_overrides(raw, overrides)
    errors: list[str] = []

    sections = {"run": RunConfig, "model": ModelConfig, "defaults": Defaults}
    for key in raw:
        if key not in sections and key != "stages":
            errors.append(f"{path}:{lines.get((key,), '?')}: {key}: unknown section"
                          f"{_closest(key, [*sections, 'stages'])} (sections: run, model, defaults, stages)")
    parsed: dict[str, Any] = {}
    for key, model in sections.items():
        if key not in raw and key != "defaults":
            errors.append(f"{path}: missing section `{key}`")
            continue
        parsed[key] = _validate(model, raw.get(key) or {}, (key,), errors, path, lines, overridden)

    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        errors.append(f"{path}: `stages` must be a mapping of stage name -> stage spec, with at least one stage")
        stages_raw = {}
    stages: dict[str, StageSpec] = {}
    for name, spec in stages_raw.items():
        where = f"{path}:{lines.get(('stages', name), '?')}"
        if not isinstance(spec, dict):
            errors.append(f"{where}: stages.{name}: a stage is a mapping with at least `kind`")
            continue
        kind_name = spec.get("kind")
        if kind_name is None:
            errors.append(f"{where}: stages.{name}: missing `kind` (one of: {', '.join(kind_names())})")
            continue
        if kind_name not in kind_names():
            errors.append(f"{where}: stages.{name}.kind: unknown kind '{kind_name}'"
                          f"{_closest(str(kind_name), kind_names())} (kinds: {', '.join(kind_names())})")
            continue
        spec_cls = get_kind(kind_name).Spec
        stage = _validate(spec_cls, spec, ("stages", name), errors, path, lines, overridden)
        if stage is not None:
            stages[name] = stage

    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
    recipe = Recipe(run=parsed["run"], model=parsed["model"], defaults=parsed["defaults"], stages=stages)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), raw=raw, overrides=overrides)
