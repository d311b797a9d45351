"""Plan a run: validate the graph, materialise data, fingerprint every stage, find cached ones."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from instar.config.load import LoadedRecipe
from instar.config.resolve import resolve_stage
from instar.config.schema import StageSpec
from instar.data.sources import file_hash, materialize
from instar.errors import DataError, RecipeError
from instar.graph.dag import StageGraph
from instar.graph.fingerprint import stage_fingerprint
from instar.models.export import read_meta
from instar.trainer.batch import batch_layout


@dataclass
class StagePlan:
    name: str
    kind: str
    parents: list[str]
    spec: StageSpec  # resolved
    fingerprint: str
    checkpoint_key: str
    data_paths: list[Path] = field(default_factory=list)
    data_hashes: dict[str, str] = field(default_factory=dict)
    cached: bool = False


def _hash(path: Path, stage: str) -> str:
    if path.is_dir():  # token shards: index.json holds each shard file's sha256
        from instar.data.shards import shards_hash

        return shards_hash(path)
    if not path.is_file():
        raise DataError(f"stage '{stage}': data file not found: {path} (relative paths are resolved against "
                        f"the recipe's folder)")
    return file_hash(path)


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory, or say why it cannot be: before any data is generated or stage trained."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()  # an existing folder may still be read-only
    except OSError as exc:
        raise RecipeError(f"run.output_dir: cannot write the run directory {run_dir} ({exc.strerror}: "
                          f"{exc.filename}); a file is in the way or the folder is read-only: point "
                          f"run.output_dir at a folder you can write") from None


def make_plan(loaded: LoadedRecipe) -> list[StagePlan]:
    """Every stage in topological order with its fingerprint and whether its artifact is current."""
    from instar.kinds import definition

    recipe, run_dir, base_dir = loaded.recipe, loaded.run_dir, loaded.base_dir
    graph = StageGraph(recipe)
    make_run_dir(run_dir)
    fingerprints: dict[str, str] = {}
    plan = []
    for name in graph.topo_order():
        spec = resolve_stage(recipe, name)
        kind = definition(spec.kind)
        data_specs = kind.data_specs(name, recipe.stages[name], recipe)
        paths = [materialize(ds, base_dir, run_dir) for ds in data_specs]
        hashes = {str(p): _hash(p, name) for p in paths}
        eval_hashes = []
        if spec.eval.exact_match is not None:
            eval_path = materialize(spec.eval.exact_match.data, base_dir, run_dir)
            eval_hashes = [_hash(eval_path, name)]
        parent_fps = [fingerprints[p] for p in spec.after]
        all_hashes = [hashes[str(p)] for p in paths] + eval_hashes
        global_batch = batch_layout(spec.train, spec.distributed.world_size, name).global_batch_size
        fp = stage_fingerprint(name, spec, recipe, parent_fps, all_hashes, global_batch)
        key = stage_fingerprint(name, spec, recipe, parent_fps, all_hashes, None)
        fingerprints[name] = fp
        meta = read_meta(run_dir / name / "model")
        plan.append(StagePlan(name=name, kind=spec.kind, parents=list(spec.after), spec=spec, fingerprint=fp,
                              checkpoint_key=key,
                              data_paths=paths, data_hashes=hashes,
                              cached=meta is not None and meta.get("fingerprint") == fp))
    return plan
