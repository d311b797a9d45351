"""`instar submit --executor slurm` on a real Slurm cluster (`make test` starts a one-node one with
scripts/slurm-cluster.sh): a fan-in graph with a hostile stage name runs to the end; a stage
signalled with USR2 checkpoints, requeues and ends at the uninterrupted weights; a stage killed
with SIGKILL fails, leaves its dependants unrun, `instar status` names it and its log, and
submitting again resumes it from its last complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from instar.launch.slurm import job_info
from tests.conftest import tiny_recipe, write_recipe

STAGE = "sft_steps"  # stage names are plain folder names (checked on load); the run folder is any path


def _cluster_up() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no sbatch/sinfo on PATH (`make slurm-up` installs and starts a one-node cluster as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not answer ({exc})"
    if not any(state.strip().rstrip("*") in ("idle", "mixed", "allocated") for state in out.splitlines()):
        return f"no Slurm node is up (sinfo: {out.strip() or 'nothing'}); run `make slurm-up`"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))]


@pytest.fixture(autouse=True)
def _cancel_own_jobs(tmp_path: Path):
    """A test that fails or is interrupted must not leave its jobs on the test cluster: three such
    jobs held its CPUs for hours (found 2026-11-27). Its jobs are those submitted from tmp_path."""
    yield
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=30).stdout
    own = [job for job, _, workdir in (line.partition(" ") for line in out.splitlines())
           if Path(workdir) == tmp_path or tmp_path in Path(workdir).parents]
    if own:
        subprocess.run(["scancel", *own], timeout=30)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "instar.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)
    return done


def _state(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "state.json").read_text())


def _wait(run_dir: Path, stages: list[str], timeout: float = 600) -> None:
    """Until no job of these stages is queued or running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [_state(run_dir, s)["job_id"] for s in stages if (run_dir / s / "state.json").exists()]
        if not any(job_info(job).alive for job in jobs):
            return
        time.sleep(2)
    raise AssertionError(f"jobs of {stages} still queued or running after {timeout} s")


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage / "model" / "model.safetensors"))


def test_fan_in_graph_in_a_hostile_folder_runs_to_the_end(tmp_path: Path):
    recipe = tiny_recipe()
    stages = recipe["stages"]
    stages["pretrain"]["distributed"] = {"engine": "deepspeed", "nproc_per_node": 2}  # srun torchrun, c10d
    recipe["run"]["output_dir"] = str(tmp_path / "out dir 'x'")  # a quote and a space: every path needs quoting
    path = write_recipe(tmp_path, recipe)
    run_dir = tmp_path / "out dir 'x'" / "t"
    names = ["pretrain", "cpt", "sft", STAGE, "merged"]

    done = _cli(["submit", str(path), "--time", "10"], tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = {s: _state(run_dir, s)["job_id"] for s in names}
    assert len(set(jobs.values())) == 5
    merged_deps = _state(run_dir, "merged")["dependencies"]
    assert sorted(merged_deps) == sorted([jobs["sft"], jobs[STAGE]])  # fan-in: afterok on both parents
    again = _cli(["submit", str(path)], tmp_path)  # while queued or running: nothing is submitted twice
    assert "0 job(s) submitted" in again.stdout, again.stdout + again.stderr
    assert {s: _state(run_dir, s)["job_id"] for s in names} == jobs

    _wait(run_dir, names)
    status = _cli(["status", str(run_dir)], tmp_path)
    assert status.returncode == 0 and status.stdout.count(" done ") == 5, status.stdout
    for stage in names:
        meta = json.loads((run_dir / stage / "model" / "instar.json").read_text())
        assert meta["stage"] == stage
        AutoModelForCausalLM.from_pretrained(run_dir / stage / "model")
    assert json.loads((run_dir / "pretrain" / "model" / "instar.json").read_text())["world_size"] == 2
    a, b, m = _weights(run_dir, "sft"), _weights(run_dir, STAGE), _weights(run_dir, "merged")
    for key in m:
        torch.testing.assert_close(m[key], (a[key].double() + b[key].double()).div(2).float())
    log = Path(_state(run_dir, "pretrain")["log"]).read_text()
    assert "launcher: torchrun, 2 rank(s)" in log and "job step exited with code 0" in log

    final = _cli(["submit", str(path)], tmp_path)
    assert "0 job(s) submitted, 0 still queued or running, 5 stage(s) already done" in final.stdout, final.stdout


def test_usr2_checkpoints_requeues_and_ends_at_the_uninterrupted_weights(tmp_path: Path):
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "cpt": recipe["stages"]["cpt"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 200, "checkpoint_every": 0}  # only the preemption saves
    recipe["stages"]["pretrain"]["distributed"] = {"engine": "deepspeed", "nproc_per_node": 2}
    recipe["defaults"]["eval"] = {}
    path = write_recipe(tmp_path, recipe)
    runs = tmp_path / "runs"

    # The uninterrupted run goes through the same Slurm path, at the same time.
    assert _cli(["submit", str(path), "run.name=reference"], tmp_path).returncode == 0
    done = _cli(["submit", str(path), "run.name=preempted"], tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = runs / "preempted"
    job = _state(run_dir, "pretrain")["job_id"]
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        time.sleep(0.05)
    assert metrics.is_file(), "the stage never started"
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)  # what --signal=B:USR2@N sends

    _wait(runs / "reference", ["pretrain", "cpt"])
    _wait(run_dir, ["pretrain", "cpt"])
    log = Path(_state(run_dir, "pretrain")["log"]).read_text()
    assert "stopped at step" in log and f"requeued job {job}" in log, log
    assert "(restart 1)" in log and log.rstrip().endswith("job step exited with code 0"), log
    assert job_info(job).restarts == 1
    for stage in ("pretrain", "cpt"):
        want, got = _weights(runs / "reference", stage), _weights(run_dir, stage)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), stage


def test_a_stage_killed_with_sigkill_fails_its_dependants_stay_unrun_and_submit_again_resumes(tmp_path: Path):
    """SIGKILL mid-training (what Slurm sends after KillWait, or an OOM kill): the stage fails, its
    dependants never run, `instar status` names it and its log; submitting again resumes it from the
    last complete checkpoint and ends at the uninterrupted run's weights."""
    recipe = tiny_recipe()
    recipe["stages"] = {name: recipe["stages"][name] for name in ("pretrain", "cpt", "sft")}
    recipe["stages"]["pretrain"]["train"] = {"steps": 200, "checkpoint_every": 20}
    recipe["defaults"]["eval"] = {}
    path = write_recipe(tmp_path, recipe)
    runs, names = tmp_path / "runs", ["pretrain", "cpt", "sft"]
    assert _cli(["submit", str(path), "run.name=reference", "--quiet"], tmp_path).returncode == 0
    assert _cli(["submit", str(path), "run.name=killed"], tmp_path).returncode == 0
    run_dir = runs / "killed"
    job = _state(run_dir, "pretrain")["job_id"]
    ckpt = run_dir / "pretrain" / "checkpoints" / "step-00000040"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.02)
    # Like the kernel's OOM killer: SIGKILL to the rank itself (`scancel` would cancel the whole job).
    header = (run_dir / "pretrain" / "logs" / "rank0.log").read_text().splitlines()[0]
    os.kill(int(header.split(" pid ")[1].split()[0]), signal.SIGKILL)
    _wait(run_dir, names)

    status = _cli(["status", str(run_dir)], tmp_path)
    log = _state(run_dir, "pretrain")["log"]
    assert f"pretrain: failed, Slurm job {job} FAILED" in status.stdout and f"log {log}" in status.stdout, status.stdout
    assert "cpt: cancelled" in status.stdout and "sft: cancelled" in status.stdout and "never ran" in status.stdout
    assert not (run_dir / "pretrain" / "model").exists()
    assert not (run_dir / "cpt" / "logs").exists() and not (run_dir / "sft" / "logs").exists()

    again = _cli(["submit", str(path), "run.name=killed"], tmp_path)
    assert "3 job(s) submitted" in again.stdout, again.stdout + again.stderr
    _wait(runs / "reference", names)
    _wait(run_dir, names)
    resumed = Path(_state(run_dir, "pretrain")["log"]).read_text()
    assert "resuming from step-000000" in resumed, resumed
    for stage in names:
        want, got = _weights(runs / "reference", stage), _weights(run_dir, stage)
        assert all(torch.equal(want[k], got[k]) for k in want), stage
    status = _cli(["status", str(run_dir)], tmp_path)
    assert status.stdout.count(" done ") == 3, status.stdout
