"""What a stage needs to run: its resolved spec, where it lives, and its parents."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from instar.config.load import LoadedRecipe
from instar.config.schema import StageSpec


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
        return self.run_dir / self.name

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    def parent_model_dir(self, parent: str) -> Path:
        return self.run_dir / parent / "model"

    @property
    def seed(self) -> int:
        """The run seed mixed with the stage name, so sibling stages draw different streams."""
        return (self.loaded.recipe.run.seed * 1_000_003 + zlib.crc32(self.name.encode())) % (2**31)
