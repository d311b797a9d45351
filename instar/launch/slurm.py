"""Slurm: one sbatch script per stage, the sbatch call that queues it, and what Slurm says of a job.

A stage's job runs `srun` with one task per node; each task is `torchrun` with c10d rendezvous on
the allocation's first host (`--rdzv-id=$SLURM_JOB_ID`, `$SLURM_NNODES` nodes), which starts the
stage's ranks (`instar.graph.worker`). Stages that run in one process (engine `single`, merges)
run the worker directly as the job's one task.

Preemption: the script asks for `--signal=B:USR2@N` and `--requeue`. `B:` signals the batch shell
only, so the shell forwards USR2 to the job step (`scancel --signal=USR2 $SLURM_JOB_ID` reaches
every step's processes on every node). torchrun is started with USR2 ignored (it has no handler of
its own, so the signal would kill it and the ranks with it); the ranks catch USR2 and TERM (which
Slurm sends before killing, and torchrun passes on), checkpoint at the next step and rank 0
requeues the job (see `instar.launch.preempt`).

Everything that comes from the recipe or the command line is quoted with shlex.quote; sbatch
itself is called with an argument list.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from instar.errors import InstarError


class SlurmError(InstarError):
    """Slurm refused something (no sbatch, a bad partition, a bad option)."""


# Slurm job states in which the job is still going to run (or is running).
ALIVE = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
         "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_NAME = re.compile(r"^[A-Za-z0-9_.,+-]+$")  # partitions, accounts, QOS (comma lists allowed)
_TIME = re.compile(r"^[0-9]+([-:][0-9]+){0,3}$|^(UNLIMITED|INFINITE)$")


@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    sbatch_lines: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. "--mem=8G"
    container_image: str | None = None
    signal_seconds: int = 120

    def check(self) -> None:
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            if value is not None and not _NAME.match(value):
                raise SlurmError(f"{flag} {value!r}: Slurm names are letters, digits and _ . , + -; check the name "
                                 f"(`sinfo -s` lists partitions)")
        if self.time is not None and not _TIME.match(self.time):
            raise SlurmError(f"--time {self.time!r}: give minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
        for flag, value in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value < (0 if flag == "--gpus-per-node" else 1):
                raise SlurmError(f"{flag} {value}: must be a positive number")
        if self.signal_seconds < 1:
            raise SlurmError(f"--signal-seconds {self.signal_seconds}: give the seconds before the time limit "
                             f"at which the stage should checkpoint and requeue (>= 1)")
        for line in self.sbatch_lines:
            if not line.startswith("-") or "\n" in line or "\r" in line:
                raise SlurmError(f"--sbatch {line!r}: give one sbatch option per --sbatch, e.g. --sbatch=--mem=8G")
        if self.container_image is not None and (not self.container_image.strip() or "\n" in self.container_image):
            raise SlurmError(f"--container-image {self.container_image!r}: give an image name, e.g. "
                             f"nvcr.io#nvidia/pytorch:24.05-py3 or a .sqsh file")


@dataclass
class StageJob:
    """What the script of one stage needs to know about it."""

    name: str
    kind: str
    ranked: bool  # torchrun with DeepSpeed ranks (else the worker in one process)
    nnodes: int
    nproc_per_node: int


def file_stem(stage: str) -> str:
    """A file-name-safe form of a stage name (any YAML key); a hash keeps two names apart."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", stage)
    return safe if safe == stage else f"{safe}-{hashlib.sha1(stage.encode()).hexdigest()[:6]}"


def script_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "slurm" / f"{file_stem(stage)}.sbatch"


def log_pattern(run_dir: Path, stage: str) -> Path:
    return run_dir / "slurm" / f"{file_stem(stage)}-%j.log"


def log_path(run_dir: Path, stage: str, job_id: str) -> Path:
    return run_dir / "slurm" / f"{file_stem(stage)}-{job_id}.log"


def _mounts(paths: list[Path]) -> str:
    unique: list[Path] = []
    for p in sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts)):
        if not any(p.is_relative_to(u) for u in unique):
            unique.append(p)
    for p in unique:
        if "," in str(p) or ":" in str(p):
            raise SlurmError(f"{p}: pyxis --container-mounts cannot name a path holding ',' or ':'; "
                             f"move the run (run.output_dir) or the recipe to a plain path")
    return ",".join(f"{p}:{p}" for p in unique)


def render_script(run_dir: Path, job: StageJob, opts: SlurmOptions, *, run_name: str, workdir: Path,
                  recipe_dir: Path) -> str:
    """The sbatch script of one stage (the same script runs again when Slurm requeues the job)."""
    q = shlex.quote
    run_dir, workdir = run_dir.resolve(), workdir.resolve()
    sb = [f"--job-name=instar-{run_name}-{file_stem(job.name)}",
          f"--nodes={job.nnodes if job.ranked else 1}", "--ntasks-per-node=1"]
    if opts.cpus_per_task:
        sb.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.gpus_per_node:
        sb.append(f"--gpus-per-node={opts.gpus_per_node if job.ranked else 1}")
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("account", opts.account),
                        ("qos", opts.qos)):
        if value:
            sb.append(f"--{flag}={value}")
    sb += [f"--signal=B:USR2@{opts.signal_seconds}", "--requeue", "--open-mode=append",
           "--kill-on-invalid-dep=yes", *opts.sbatch_lines]

    if opts.container_image:
        python = "python3"
        srun_extra = [f"--container-image={opts.container_image}",
                      f"--container-mounts={_mounts([run_dir, workdir, recipe_dir])}",
                      f"--container-workdir={workdir}"]
        env_extra = []
    else:
        python = sys.executable
        srun_extra = []
        # DeepSpeed's JIT-built ops are cached beside the environment, as `instar run` does.
        env_extra = ['[ -n "${TORCH_EXTENSIONS_DIR:-}" ] || export TORCH_EXTENSIONS_DIR='
                     + q(str(Path(sys.prefix) / "torch_extensions"))]
    worker = ["-m", "instar.graph.worker", str(run_dir), job.name]
    if job.ranked:
        rank_cmd = (f"{q(python)} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" "
                    f"--nproc-per-node={job.nproc_per_node} --rdzv-backend=c10d "
                    f"--rdzv-endpoint=\"$head_node:$rdzv_port\" --rdzv-id=\"$SLURM_JOB_ID\" --max-restarts=0 "
                    + " ".join(q(a) for a in worker))
    else:
        rank_cmd = f"{q(python)} " + " ".join(q(a) for a in worker)
    srun = " ".join(["srun", "--kill-on-bad-exit=1", *(q(a) for a in srun_extra)])
    lines = [
        "#!/bin/bash",
        # json.dumps: a comment must stay on one line whatever the stage name holds.
        f"# instar stage {json.dumps(job.name)} ({job.kind}) of run {json.dumps(str(run_dir))}, "
        "written by `instar submit`.",
        "# Slurm runs it again from the top when the job is requeued; the stage resumes from its checkpoint.",
        *(f"#SBATCH {s}" for s in sb),
        "set -u",
        f"cd {q(str(workdir))} || exit 1",
        "export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=\"${OMP_NUM_THREADS:-1}\" INSTAR_REQUEUE_JOB=\"$SLURM_JOB_ID\"",
        '[ -e /dev/nvidia0 ] || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"',
        *env_extra,
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "rdzv_port=$((20000 + SLURM_JOB_ID % 20000))",
        f'echo "[instar] job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, stage:" '
        f"{q(job.name)}",
        "# USR2 (time limit near, or `scancel --signal=USR2 --batch`) reaches this shell only: pass it to the",
        "# job step. The ranks checkpoint at the next step and requeue the job. TERM goes to every process",
        "# anyway; this shell waits for the step instead of dying first. torchrun must not die of USR2.",
        'trap \'scancel --signal=USR2 "$SLURM_JOB_ID"\' USR2',
        "trap 'echo \"[instar] SIGTERM: waiting for the ranks to checkpoint\"' TERM",
        f"{srun} bash -c 'trap \"\" USR2; exec \"$@\"' instar-rank {rank_cmd} &",
        "step=$!",
        'while :; do wait "$step"; code=$?; kill -0 "$step" 2>/dev/null || break; done',
        'echo "[instar] job step exited with code $code"',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def sbatch_command(script: Path, log: Path, dependencies: list[str]) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--output={log}"]
    if dependencies:
        cmd.append("--dependency=afterok:" + ":".join(dependencies))
    return cmd + [str(script)]


def require(tool: str = "sbatch") -> None:
    if shutil.which(tool) is None:
        raise SlurmError(f"--executor slurm needs `{tool}` on PATH and it is not there: run `instar submit` on a "
                         f"Slurm login node, or choose another executor (--executor local runs the stages here, "
                         f"like `instar run`)")


def sbatch(cmd: list[str], stage: str) -> str:
    """Queue one job; returns its id. Slurm's own message is passed on verbatim on failure."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"stage '{stage}': could not run sbatch: {exc}") from None
    if done.returncode != 0:
        raise SlurmError(f"stage '{stage}': sbatch refused the job (exit {done.returncode}):\n"
                         f"{(done.stderr or done.stdout).strip()}")
    return done.stdout.strip().split(";")[0]


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)


@dataclass
class JobInfo:
    job_id: str
    state: str  # Slurm's JobState, or UNKNOWN when Slurm no longer knows the job (or is unreachable)
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.state in ALIVE


def job_info(job_id: str) -> JobInfo:
    """What `scontrol show job` says (Slurm keeps finished jobs for MinJobAge seconds)."""
    if shutil.which("scontrol") is None:
        return JobInfo(job_id, "UNKNOWN", "scontrol is not on PATH")
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return JobInfo(job_id, "UNKNOWN", str(exc))
    if done.returncode != 0:
        return JobInfo(job_id, "UNKNOWN", (done.stderr or done.stdout).strip())
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
    return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""), fields.get("ExitCode", ""),
                   int(fields.get("Restarts", "0") or 0))


_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}


def stage_status_from_slurm(state: dict) -> tuple[str, dict]:
    """(status, details) of a stage queued by `instar submit` whose artifact is not there (yet):
    running | pending | failed | cancelled, with `slurm` (job id and state) and `error` for a note."""
    job = str(state.get("job_id"))
    info = job_info(job)
    reason = "" if info.reason in ("", "None", "(null)") else info.reason
    details = {**state, "slurm": f"{job} {info.state}" + (f" ({reason})" if reason else "")}
    log = state.get("log", "")
    if info.state in _RUNNING:
        return "running", details
    if info.alive:
        return "pending", details
    if info.state == "CANCELLED" and reason.startswith("Dependency"):
        return "cancelled", {**details, "error": "never ran: a stage it waits for failed (Slurm cancelled it)"}
    if info.state == "CANCELLED":
        return "cancelled", {**details, "error": f"job {job} was cancelled; log: {log}"}
    if info.state == "UNKNOWN":
        return "failed", {**details, "error": f"Slurm no longer knows job {job} ({reason or 'aged out'}) and the "
                                              f"stage left no artifact; log: {log}"}
    what = "completed without writing its artifact" if info.state == "COMPLETED" else info.state
    return "failed", {**details, "error": f"job {job} {what} (exit {info.exit_code}); log: {log}"}
