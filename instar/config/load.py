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
from instar.config.schema import Defaults, ModelConfig, Recipe, RunConfig, StageSpec, stage_name_problem
from instar.errors import RecipeError


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    raw: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    lines: dict[tuple, int] = field(default_factory=dict)  # key path -> line in `path`, for messages

    @property
    def base_dir(self) -> Path:
        """Relative data and model paths in a recipe are resolved against its own folder."""
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.run.output_dir) / self.recipe.run.name


# A recipe is a few hundred YAML values; anchors and aliases may not multiply it past this
# ("billion laughs": nine nested aliases expand to 10^9 values and exhaust memory).
MAX_YAML_VALUES = 100_000


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand to too many values, or that holds itself."""
    sizes: dict[int, int] = {}  # node id -> expanded size; -1 while being counted

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise RecipeError(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to a node that "
                                  f"contains it (a recursive structure); write the value out")
            return sizes[id(node)]
        sizes[id(node)] = -1
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_VALUES:
            raise RecipeError(f"{path}:{node.start_mark.line + 1}: YAML anchors and aliases expand this "
                              f"recipe to more than {MAX_YAML_VALUES:,} values; write it with fewer aliases")
        sizes[id(node)] = total
        return total

    size(root)


def _key_lines(node: yaml.Node, path: tuple = (), duplicates: set | None = None) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line number (by the key as written and
    as YAML reads it, e.g. 1 or null); a key given twice in one mapping goes into `duplicates`."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            # Keys are scalars here: safe_load has already refused unhashable ones.
            key = yaml.constructor.SafeConstructor().construct_object(key_node)
            if key_node.tag != "tag:yaml.org,2002:merge" and duplicates is not None:
                if key in seen:
                    duplicates.add((".".join(str(p) for p in path + (key,)), seen[key], line))
                seen.setdefault(key, line)
            lines[path + (key_node.value,)] = lines[path + (key,)] = line
            lines.update(_key_lines(value_node, path + (key,), duplicates))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, path + (i,), duplicates))
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_expansion(node, path)
        raw = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: the YAML nests too deeply; a recipe is a few levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with sections run, model, defaults, stages")
    duplicates: set[tuple[str, int, int]] = set()
    lines = _key_lines(node, (), duplicates) if node is not None else {}
    if duplicates:  # YAML keeps the last one silently: a duplicated stage or `lr` would be lost
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(
            f"{path}:{second}: {key}: given twice (also at line {first}); keep one"
            for key, first, second in sorted(duplicates, key=lambda d: (d[2], d[0]))))
    return raw, lines


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


def _where(path: Path, lines: dict[tuple, int], overridden: set[tuple], loc: tuple) -> str:
    """`file:line` of the deepest part of `loc` the recipe has, or the override that set (or created) it."""
    set_here = sorted(tuple(str(q) for q in o) for o in overridden)
    for depth in range(len(loc), 0, -1):
        part = tuple(str(p) for p in loc[:depth])
        if part in set_here:
            return f"command-line override {'.'.join(part)}"
        if loc[:depth] in lines:
            return f"{path}:{lines[loc[:depth]]}"
        # Absent from the file but below an override's path: `stages.new.kind=sft` created stages.new.
        created = [o for o in set_here if o[:depth] == part]
        if created:
            return f"command-line override {'.'.join(created[0])}"
    return str(path)


def _format_error(err: dict, prefix: tuple, model: type[BaseModel], path: Path,
                  lines: dict[tuple, int], overridden: set[tuple]) -> str:
    loc = prefix + tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    where = _where(path, lines, overridden, loc)
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
    from instar.kinds import definition, kind_names

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
        where = _where(path, lines, overridden, ("stages", name))
        problem = stage_name_problem(name)
        if problem:
            shown = name if len(str(name)) <= 40 else f"{str(name)[:40]}..."
            errors.append(f"{where}: stages.{shown}: {problem}")
            continue
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
        spec_cls = definition(kind_name).Spec
        stage = _validate(spec_cls, spec, ("stages", name), errors, path, lines, overridden)
        if stage is not None:
            stages[name] = stage

    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
    recipe = Recipe(run=parsed["run"], model=parsed["model"], defaults=parsed["defaults"], stages=stages)
    if recipe.model.config is not None:
        from instar.config.model_check import non_finite_keys

        bad = non_finite_keys(recipe.model.config)
        if bad:
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(
                f"{_where(path, lines, overridden, ('model', 'config', key))}: model.config.{key}: "
                f"{recipe.model.config[key]!r} holds a non-finite number; give a finite one" for key in bad))
    return LoadedRecipe(recipe=recipe, path=path.resolve(), raw=raw, overrides=overrides, lines=lines)


def check_model(loaded: LoadedRecipe) -> None:
    """RecipeError for keys of `model.config` HF would ignore and a `seq_len` past the model's
    positions (every stage trains the root model's architecture, so one bound holds for all).
    Apart from `load_recipe`: HF's config classes import torch (~2 s), which a recipe whose stages
    are all cached never needs. `validate`, `plan`, `submit` and a run with a pending stage call it."""
    errors = _model_errors(loaded, loaded.lines)
    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))


def _model_errors(loaded: LoadedRecipe, lines: dict[tuple, int]) -> list[str]:
    from instar.config.model_check import check_model_config, model_dir_positions
    from instar.config.resolve import resolve_stage

    model, path = loaded.recipe.model, loaded.path
    errors = []
    if model.config is not None:
        problems, positions = check_model_config(model.config)
        for key, problem in problems:
            errors.append(f"{path}:{lines.get(('model', 'config', key), '?')}: model.config.{key}: {problem}")
    else:
        folder = Path(model.path)
        positions = model_dir_positions(folder if folder.is_absolute() else loaded.base_dir / folder)
    fix = "raise model.config.max_position_embeddings" if model.config is not None else "use a longer model"
    for name in loaded.recipe.stages if positions is not None else ():
        seq_len = resolve_stage(loaded.recipe, name).train.seq_len
        if seq_len > positions:
            line = lines.get(("stages", name, "train", "seq_len"), lines.get(("defaults", "train", "seq_len"), "?"))
            errors.append(f"{path}:{line}: stages.{name}.train.seq_len: {seq_len} is more than the model's "
                          f"max_position_embeddings ({positions}); lower seq_len or {fix}")
    return errors
