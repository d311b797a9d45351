"""What a stage needs to run: its resolved spec, where it lives, and its parents."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from instar.config.load import LoadedRecipe
from instar.config.schema import StageSpec, stage_name_problem
from instar.errors import RecipeError


def stage_folder(run_dir: Path, name: str) -> Path:
    """`run_dir/name`, the only folder a stage writes or deletes in: refused unless `name` is one
    plain folder name (recipes are checked on load; this also guards names from argv/graph.json)."""
    problem = stage_name_problem(name)
    folder = run_dir / str(name)
    if problem is None and folder.resolve().parent != run_dir.resolve():
        problem = f"stage folder {folder} resolves outside the run directory {run_dir}"
    if problem:
        raise RecipeError(f"stage {name!r}: {problem}")
    return folder


@dataclass
class StageContext:
    name: str
    spec: StageSpec  # resolved: defaults merged in
    loaded: LoadedRecipe
    fingerprint: str
    parents: list[str]
    checkpoint_key: str = ""
    data_paths: list[Path] = field(default_factory=list)  # the kind's data sources, materialised
    data_hashes: dict[str, str] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    quiet: bool = False

    @property
    def run_dir(self) -> Path:
        return self.loaded.run_dir

    @property
    def stage_dir(self) -> Path:
        return stage_folder(self.run_dir, self.name)

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    def parent_model_dir(self, parent: str) -> Path:
        return stage_folder(self.run_dir, parent) / "model"

    @property
    def seed(self) -> int:
        """The run seed mixed with the stage name, so sibling stages draw different streams."""
        return (self.loaded.recipe.run.seed * 1_000_003 + zlib.crc32(self.name.encode())) % (2**31)
