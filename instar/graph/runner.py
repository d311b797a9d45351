"""Run a recipe: plan, check everything that can be checked up front, then run pending stages
in topological order (in this process), skipping stages whose artifact is current."""

from __future__ import annotations

import fcntl
import json
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from instar.config.load import LoadedRecipe, check_model
from instar.console import say
from instar.data.formats import ROW_FORMATS
from instar.data.jsonl import read_rows
from instar.errors import ContractError, InstarError
from instar.graph.plan import StagePlan, make_plan
from instar.graph.state import write_state
from instar.launch.preempt import stop_on_signals
from instar.models.export import read_meta, remove_leftovers, remove_tree, write_json_atomic
from instar.trainer.context import stage_folder
from instar.trainer.stop import Interrupted, Preempted, received, signal_name


@dataclass
class StageResult:
    name: str
    kind: str
    cached: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `instar run` per run directory at a time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstarError(f"{run_dir}: another `instar run` is using this run directory; wait for it "
                              f"or give this run another run.name") from None
        yield


def _effective_tokenizers(loaded: LoadedRecipe, plan: list[StagePlan]) -> dict[str, str]:
    out: dict[str, str] = {}
    for sp in plan:
        own = sp.spec.tokenizer
        out[sp.name] = own or (out[sp.parents[0]] if sp.parents else loaded.recipe.model.tokenizer)
    return out


def precheck(loaded: LoadedRecipe, plan: list[StagePlan]) -> None:
    """Fail before any training on what can be known now: bad data rows, tokenizer mismatches."""
    from instar.kinds import definition

    pending = [sp for sp in plan if not sp.cached]
    for sp in pending:
        kind = definition(sp.kind)
        specs = kind.data_specs(sp.name, loaded.recipe.stages[sp.name], loaded.recipe)
        for path, ds in zip(sp.data_paths, specs):
            if ds.shards is None:
                read_rows(path, ROW_FORMATS[kind.row_format], ds.on_bad_row, ds.max_rows)
    effective = _effective_tokenizers(loaded, plan)
    for sp in pending:  # token shards: files complete, and made with the stage's tokenizer
        specs = definition(sp.kind).data_specs(sp.name, loaded.recipe.stages[sp.name], loaded.recipe)
        for path, ds in zip(sp.data_paths, specs):
            if ds.shards is not None:
                from instar.data.shards import TokenShards
                from instar.data.tokenizer import load_tokenizer

                TokenShards(path).check_tokenizer(load_tokenizer(effective[sp.name], loaded.base_dir),
                                                  f"stages.{sp.name}.data.shards")
    for sp in pending:
        reference = getattr(sp.spec, "reference", None)  # dpo/grpo score with another stage's model
        for other in [*sp.parents, *([reference] if reference else [])]:
            if effective[other] != effective[sp.name]:
                _check_same_tokenizer(loaded, sp.name, effective[sp.name], other, effective[other])


def _check_same_tokenizer(loaded, stage, spec, parent, parent_spec) -> None:
    from instar.data.tokenizer import load_tokenizer
    from instar.trainer.setup import same_vocabulary

    a, b = load_tokenizer(spec, loaded.base_dir), load_tokenizer(parent_spec, loaded.base_dir)
    if not same_vocabulary(a, b):
        raise ContractError(f"stage '{stage}': its tokenizer '{spec}' ({len(a)} tokens) differs from stage "
                            f"'{parent}''s tokenizer '{parent_spec}' ({len(b)} tokens); that stage's weights "
                            f"only fit its own vocabulary. Drop stages.{stage}.tokenizer to inherit it")


def save_run_files(loaded: LoadedRecipe, plan: list[StagePlan], quiet: bool = False) -> None:
    """The fully resolved recipe and the graph (for `instar status`) in the run directory."""
    run_dir = loaded.run_dir
    resolved = {
        "run": loaded.recipe.run.model_dump(mode="json"),
        "model": loaded.recipe.model.model_dump(mode="json"),
        "stages": {sp.name: sp.spec.model_dump(mode="json") for sp in plan},
    }
    tmp = run_dir / ".recipe.resolved.yaml.tmp"
    tmp.write_text(f"# resolved from {loaded.path} with overrides {loaded.overrides}\n"
                   + yaml.safe_dump(resolved, sort_keys=False))
    os.replace(tmp, run_dir / "recipe.resolved.yaml")
    write_json_atomic(run_dir / "graph.json", {
        "recipe": str(loaded.path),
        "overrides": loaded.overrides,
        "quiet": quiet,
        "stages": [{"name": sp.name, "kind": sp.kind, "parents": sp.parents, "fingerprint": sp.fingerprint}
                   for sp in plan],
    })


def _run_stage(loaded: LoadedRecipe, sp: StagePlan, quiet: bool, node_rank: int) -> dict[str, Any]:
    """Run one stage in this process (engine `single`) or on its ranks under torchrun."""
    from instar.trainer.context import StageContext
    from instar.trainer.kinds import get_kind

    if sp.spec.distributed.engine == "deepspeed":
        from instar.launch.torchrun import run_stage_torchrun

        run_stage_torchrun(loaded.run_dir, sp.name, sp.spec.distributed, node_rank,
                           run_id=f"{loaded.recipe.run.name}-{sp.name}-{sp.fingerprint}")
        return (read_meta(stage_folder(loaded.run_dir, sp.name) / "model") or {}).get("metrics", {})
    ctx = StageContext(name=sp.name, spec=sp.spec, loaded=loaded, fingerprint=sp.fingerprint,
                       checkpoint_key=sp.checkpoint_key, parents=sp.parents, data_paths=sp.data_paths,
                       data_hashes=sp.data_hashes, quiet=quiet)
    return get_kind(sp.kind)(ctx).run()


def run_recipe(loaded: LoadedRecipe, quiet: bool = False, node_rank: int = 0) -> list[StageResult]:
    """Run every pending stage in order. On node_rank > 0 (a multi-node stage's other nodes) only
    the torchrun stages are joined; node 0 owns the run directory's state. A first SIGTERM or
    SIGINT checkpoints the running stage and stops (state `stopped`); a second stops at once."""
    with stop_on_signals():
        return _run_plan(loaded, quiet, node_rank)


def _run_plan(loaded: LoadedRecipe, quiet: bool, node_rank: int) -> list[StageResult]:
    plan = make_plan(loaded)
    if any(not sp.cached for sp in plan):
        check_model(loaded)
    precheck(loaded, plan)
    pending_ranked = [sp for sp in plan if not sp.cached and sp.spec.distributed.engine == "deepspeed"]
    if pending_ranked:
        from instar.launch.torchrun import check_topology

        for sp in pending_ranked:
            check_topology(sp.name, sp.spec, node_rank)
    if node_rank > 0:
        for sp in pending_ranked:
            _run_stage(loaded, sp, quiet, node_rank)
        return []
    results = []
    with run_lock(loaded.run_dir):
        save_run_files(loaded, plan, quiet)
        for sp in plan:
            stage_dir = stage_folder(loaded.run_dir, sp.name)
            if sp.cached:
                meta = read_meta(stage_dir / "model") or {}
                say(f"[{sp.name}] cached ({sp.fingerprint})", quiet)
                results.append(StageResult(sp.name, sp.kind, True, meta.get("metrics", {})))
                continue
            if received():  # the signal came between stages (e.g. during a merge): start no other
                raise Preempted(f"stopped before stage '{sp.name}' on {signal_name()}; `instar run` goes on from it")
            say(f"[{sp.name}] {sp.kind} stage starting"
                + (f" from {', '.join(sp.parents)}" if sp.parents else ""), quiet)
            # This attempt rewrites the stage's logs (metrics, eval, pairs, rollouts). An artifact
            # of another configuration must not outlive them: if the attempt were killed, it would
            # count as cached next time, beside logs that are not its own.
            remove_tree(stage_dir / "model")
            freed = remove_leftovers(stage_dir)
            if freed:
                say(f"[{sp.name}] {freed}", quiet)
            write_state(stage_dir, "running", fingerprint=sp.fingerprint)
            try:
                metrics = _run_stage(loaded, sp, quiet, node_rank)
            except (Preempted, Interrupted) as exc:  # resumable: the next `instar run` goes on from its checkpoint
                write_state(stage_dir, "stopped", fingerprint=sp.fingerprint, error=str(exc))
                raise
            except BaseException as exc:
                detail = str(exc) if isinstance(exc, InstarError) else traceback.format_exc()
                write_state(stage_dir, "failed", fingerprint=sp.fingerprint, error=detail)
                raise
            write_state(stage_dir, "done", fingerprint=sp.fingerprint)
            results.append(StageResult(sp.name, sp.kind, False, metrics))
    return results


def load_graph(run_dir: Path) -> dict[str, Any]:
    """graph.json of `run_dir` (`instar status` and `report` read it), with at least a list of named stages."""
    path = run_dir / "graph.json"
    if not path.is_file():
        raise InstarError(f"{run_dir}: not an instar run directory (no graph.json); give the folder "
                          f"<output_dir>/<run name> that `instar run` wrote")
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InstarError(f"{path}: not valid JSON ({exc}); `instar run` writes it again") from None
    except OSError as exc:
        raise InstarError(f"{path}: cannot read ({exc.strerror})") from None
    stages = graph.get("stages") if isinstance(graph, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                               for s in stages):
        raise InstarError(f"{path}: has no list of stages; `instar run` writes it again")
    return graph
