"""`instar submit --executor slurm`: prepare the run here (the login node), then queue one Slurm job
per pending stage, in topological order, each waiting for its parents (`afterok`).

Preparation is what `instar run` does before its first stage: plan (data generated, fingerprints),
precheck, `recipe.resolved.yaml` and `graph.json` (which the jobs' workers re-plan from). Each queued
stage's `state.json` records its job id, script and log. Submitting again skips finished stages,
leaves stages whose job is still queued or running alone, and queues the rest — so after a failure
it starts again from the failed stage. A queued job that waits on a parent that is queued anew
(or was made for an older fingerprint) would never start: it is cancelled and queued again.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from instar.config.load import LoadedRecipe
from instar.errors import RecipeError
from instar.graph.plan import StagePlan, make_plan
from instar.graph.runner import precheck, run_lock, save_run_files
from instar.graph.state import read_state, write_state
from instar.launch import slurm
from instar.launch.slurm import SlurmOptions, StageJob
from instar.trainer.context import stage_folder


def say(text: str, quiet: bool) -> None:
    if not quiet:  # plain print: rich would wrap the long log paths mid-line
        print(text, flush=True)


@dataclass
class Submission:
    stage: str
    action: str  # done | queued | submitted | would submit
    job_id: str | None = None
    log: Path | None = None


def _stage_job(sp: StagePlan, opts: SlurmOptions) -> StageJob:
    dist = sp.spec.distributed
    ranked = dist.engine == "deepspeed"
    if ranked and opts.nodes is not None and opts.nodes != dist.nnodes:
        raise RecipeError(f"stage '{sp.name}' runs on distributed.nnodes={dist.nnodes} node(s) but --nodes "
                          f"{opts.nodes}: the recipe fixes each stage's ranks (they set its batch). Add the "
                          f"override defaults.distributed.nnodes={opts.nodes} (or stages.<name>.distributed.nnodes), "
                          f"or leave out --nodes")
    if ranked and opts.gpus_per_node and dist.nproc_per_node > opts.gpus_per_node:
        raise RecipeError(f"stage '{sp.name}' runs distributed.nproc_per_node={dist.nproc_per_node} ranks per node "
                          f"but --gpus-per-node {opts.gpus_per_node}; give --gpus-per-node "
                          f"{dist.nproc_per_node} or lower nproc_per_node")
    return StageJob(sp.name, sp.kind, ranked, dist.nnodes, dist.nproc_per_node)


def _var(stage: str) -> str:
    return "JOB_" + slurm.file_stem(stage).replace("-", "_").replace(".", "_")


def submit_recipe(loaded: LoadedRecipe, opts: SlurmOptions, dry_run: bool = False,
                  quiet: bool = False) -> list[Submission]:
    opts.check()
    if not dry_run:
        slurm.require("sbatch")
    plan = make_plan(loaded)
    precheck(loaded, plan)
    jobs = {sp.name: _stage_job(sp, opts) for sp in plan if not sp.cached}
    run_dir = loaded.run_dir.resolve()
    workdir = Path.cwd()
    live = not dry_run or shutil.which("scontrol") is not None
    out: list[Submission] = []
    job_of: dict[str, str] = {}  # stage -> job id that its children wait for
    fresh: set[str] = set()  # stages queued (or to be queued) by this call
    with run_lock(loaded.run_dir):
        if not dry_run:
            save_run_files(loaded, plan, quiet)
            (run_dir / "slurm").mkdir(exist_ok=True)
        for sp in plan:
            if sp.cached:
                out.append(Submission(sp.name, "done"))
                continue
            stage_dir = stage_folder(run_dir, sp.name)
            state = read_state(stage_dir)
            old_job = state.get("job_id") if state.get("executor") == "slurm" else None
            info = slurm.job_info(old_job) if old_job and live else None
            current = state.get("fingerprint") == sp.fingerprint and not any(p in fresh for p in sp.parents)
            if info is not None and info.alive and current:
                job_of[sp.name] = old_job
                out.append(Submission(sp.name, "queued", old_job, slurm.log_path(run_dir, sp.name, old_job)))
                say(f"[{sp.name}] job {old_job} is still {info.state.lower()}; left as it is", quiet)
                continue
            script = slurm.script_path(run_dir, sp.name)
            text = slurm.render_script(run_dir, jobs[sp.name], opts, run_name=loaded.recipe.run.name,
                                       workdir=workdir, recipe_dir=loaded.base_dir)
            parents = [p for p in sp.parents if p in job_of]
            fresh.add(sp.name)
            if dry_run:
                cmd = slurm.sbatch_command(script, slurm.log_pattern(run_dir, sp.name), [])
                dep = ":".join(f"${_var(p)}" for p in parents)
                line = (shlex.join(cmd[:-1]) + (f" --dependency=afterok:{dep}" if dep else "")
                        + " " + shlex.quote(cmd[-1]))
                print(f"# ---- {script} ----\n{text}")
                print(f"{_var(sp.name)}=$({line})\n")
                job_of[sp.name] = f"${_var(sp.name)}"
                out.append(Submission(sp.name, "would submit"))
                continue
            if info is not None and info.alive:  # made for an older fingerprint, or waits on a parent queued anew
                slurm.scancel(old_job)
                say(f"[{sp.name}] cancelled job {old_job} (stale: its recipe or a parent changed)", quiet)
            script.write_text(text)
            cmd = slurm.sbatch_command(script, slurm.log_pattern(run_dir, sp.name), [job_of[p] for p in parents])
            job_id = slurm.sbatch(cmd, sp.name)
            job_of[sp.name] = job_id
            log = slurm.log_path(run_dir, sp.name, job_id)
            write_state(stage_dir, "submitted", executor="slurm", fingerprint=sp.fingerprint, job_id=job_id,
                        script=str(script), log=str(log), dependencies=[job_of[p] for p in parents])
            say(f"[{sp.name}] submitted job {job_id}"
                + (f" (after {', '.join(f'{p} {job_of[p]}' for p in parents)})" if parents else "")
                + f"; log {log}", quiet)
            out.append(Submission(sp.name, "submitted", job_id, log))
    return out
