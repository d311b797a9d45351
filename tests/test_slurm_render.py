"""`instar submit --executor slurm` without a cluster: the rendered scripts and sbatch calls
(`--dry-run`), bad options, no sbatch on PATH; and the preemption path of the worker (SIGUSR2 ->
checkpoint -> exit 75 -> resume to the uninterrupted weights) on one process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.config.load import load_recipe
from instar.graph.plan import make_plan
from instar.graph.runner import run_recipe, save_run_files
from instar.launch.preempt import PREEMPTED_EXIT
from tests.conftest import tiny_recipe, write_recipe

# A quote and a space in the run's folder (stage names are plain folder names, checked on load; the
# output directory is any path a user gives): every path must reach bash and the worker quoted.
HOSTILE = "it's a b"


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instar.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _fan_in_recipe(folder: Path) -> Path:
    recipe = tiny_recipe()
    recipe["run"]["output_dir"] = str(folder / HOSTILE / "runs")
    recipe["stages"]["pretrain"]["distributed"] = {"engine": "deepspeed", "nproc_per_node": 2}
    return write_recipe(folder, recipe)


def _scripts(out: str) -> dict[str, str]:
    """{script path: text} from the dry-run output."""
    found, current = {}, None
    for line in out.splitlines(keepends=True):
        if line.startswith("# ---- ") and line.rstrip().endswith(" ----"):
            current = line[len("# ---- "):-len(" ----\n")]
            found[current] = ""
        elif current is not None:
            if line.startswith("JOB_"):
                current = None
            else:
                found[current] += line
    return found


def test_dry_run_prints_one_quoted_script_per_stage_and_chained_sbatch_calls(tmp_path: Path):
    path = _fan_in_recipe(tmp_path)
    done = _cli(["submit", str(path), "--dry-run", "--partition", "gpu", "--time", "1:00:00", "--qos", "high",
                 "--sbatch=--mem=8G", "--sbatch=--exclusive", "--signal-seconds", "300"], tmp_path)
    assert done.returncode == 0, done.stderr
    scripts = _scripts(done.stdout)
    assert len(scripts) == 5
    run_dir = (tmp_path / HOSTILE / "runs" / "t").resolve()
    assert not (run_dir / "slurm").exists(), "a dry run queues and writes nothing"
    for name, text in scripts.items():
        assert name.startswith(str(run_dir / "slurm")) and name.endswith(".sbatch")
        check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stderr)
        for option in ("--partition=gpu", "--time=1:00:00", "--qos=high", "--mem=8G", "--exclusive",
                       "--signal=B:USR2@300", "--requeue", "--kill-on-invalid-dep=yes"):
            assert f"#SBATCH {option}\n" in text, (name, option)
    pretrain = scripts[str(run_dir / "slurm" / "pretrain.sbatch")]
    srun = next(line for line in pretrain.splitlines() if line.startswith("srun "))
    assert "torch.distributed.run" in srun and "--nproc-per-node=2" in srun and "--rdzv-backend=c10d" in srun
    assert '--rdzv-id="$SLURM_JOB_ID"' in srun and '--nnodes="$SLURM_NNODES"' in srun
    assert "trap 'scancel --signal=USR2 \"$SLURM_JOB_ID\"' USR2" in pretrain
    # The hostile run folder reaches the worker as one argument, whatever it holds.
    single = scripts[str(run_dir / "slurm" / "sft_steps.sbatch")]
    srun = next(line for line in single.splitlines() if line.startswith("srun "))
    words = shlex.split(srun.rstrip(" &"))
    assert words[-2:] == [str(run_dir), "sft_steps"] and "torch.distributed.run" not in srun
    # Every sbatch call, in topological order; the fan-in waits for both parents.
    calls = [line for line in done.stdout.splitlines() if line.startswith("JOB_")]
    assert [c.split("=", 1)[0] for c in calls] == ["JOB_pretrain", "JOB_cpt", "JOB_sft", "JOB_sft_steps",
                                                    "JOB_merged"]
    assert "--dependency=afterok:$JOB_sft:$JOB_sft_steps " in calls[-1]
    assert "--dependency" not in calls[0]
    transcript = "\n".join(calls)
    assert subprocess.run(["bash", "-n"], input=transcript, text=True).returncode == 0


def test_container_image_renders_pyxis_srun_options(tmp_path: Path):
    path = _fan_in_recipe(tmp_path)
    image = "nvcr.io#nvidia/pytorch:24.05-py3"
    done = _cli(["submit", str(path), "--dry-run", "--container-image", image, "--gpus-per-node", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = (tmp_path / HOSTILE / "runs" / "t").resolve()
    text = _scripts(done.stdout)[str(run_dir / "slurm" / "pretrain.sbatch")]
    srun = shlex.split(next(line for line in text.splitlines() if line.startswith("srun ")).rstrip(" &"))
    assert f"--container-image={image}" in srun
    mounts = next(w for w in srun if w.startswith("--container-mounts="))[len("--container-mounts="):].split(",")
    assert f"{run_dir}:{run_dir}" in mounts or any(run_dir.is_relative_to(m.split(":")[0]) for m in mounts)
    assert f"--container-workdir={tmp_path.resolve()}" in srun
    assert "python3" in srun and sys.executable not in text  # the image's python, not this machine's
    assert "#SBATCH --gpus-per-node=2\n" in text
    merge = _scripts(done.stdout)[str(run_dir / "slurm" / "merged.sbatch")]
    assert "#SBATCH --gpus-per-node=1\n" in merge  # one process, one GPU


def test_no_sbatch_on_path_names_the_executor_and_the_way_out(tmp_path: Path):
    path = _fan_in_recipe(tmp_path)
    done = _cli(["submit", str(path)], tmp_path, env={"PATH": "/nonexistent"})
    assert done.returncode == 2
    assert "--executor slurm needs `sbatch` on PATH" in done.stderr and "--executor local" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--executor", "pbs"], "invalid choice: 'pbs' (choose from 'slurm', 'local')"),
    (["--partition", "a b", "--dry-run"], "--partition 'a b'"),
    (["--time", "soon", "--dry-run"], "--time 'soon'"),
    (["--sbatch", "--mem=1G\n#SBATCH --x", "--dry-run"], "one sbatch option per --sbatch"),
    (["--nodes", "2", "--dry-run"], "stage 'pretrain' runs on distributed.nnodes=1 node(s) but --nodes 2"),
    (["--gpus-per-node", "1", "--dry-run"], "nproc_per_node=2 ranks per node but --gpus-per-node 1"),
])
def test_bad_submit_options_fail_with_a_fix(tmp_path: Path, args, message):
    path = _fan_in_recipe(tmp_path)
    done = _cli(["submit", str(path), *args], tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_usr2_checkpoints_exits_75_and_the_rerun_matches_an_uninterrupted_run(tmp_path: Path):
    """The worker's side of preemption on one process: the signal is caught, the stage stops at a
    step boundary with a checkpoint, and running the stage again ends at the same weights."""
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 150, "checkpoint_every": 0}
    recipe["defaults"]["eval"] = {}
    path = write_recipe(tmp_path, recipe)
    reference = load_recipe(path, ["run.name=reference"])
    run_recipe(reference, quiet=True)

    loaded = load_recipe(path, ["run.name=stopped"])
    save_run_files(loaded, make_plan(loaded), quiet=False)
    run_dir = loaded.run_dir
    worker = [sys.executable, "-m", "instar.graph.worker", str(run_dir), "pretrain"]
    proc = subprocess.Popen(worker, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR2)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT, out
    assert "stopped at step" in out and "SIGUSR2" in out
    checkpoints = list((run_dir / "pretrain" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not (run_dir / "pretrain" / "model").exists()

    again = subprocess.run(worker, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {checkpoints[0].name}" in again.stdout
    want = load_file(str(reference.run_dir / "pretrain" / "model" / "model.safetensors"))
    got = load_file(str(run_dir / "pretrain" / "model" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
