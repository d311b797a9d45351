"""Stop a stage cleanly when the scheduler asks: checkpoint at the next step boundary, exit with
PREEMPTED_EXIT, and (under Slurm) put the job back in the queue so it resumes from that checkpoint.

The worker installs the handlers (`install`). SIGUSR2 is what `instar submit` scripts ask Slurm to
send before the time limit (`--signal=B:USR2@N`, forwarded by the batch shell to the job step);
SIGTERM is what Slurm sends on preemption or at the time limit, KillWait seconds before SIGKILL.
A handler only records the signal (instar.trainer.stop); the loop asks `stop_requested(engine)`
once per step, so every rank stops at the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess

from instar.trainer.stop import PREEMPTED_EXIT, Preempted, arm, received, record  # noqa: F401  (the worker's API)


def _on_signal(signum, frame) -> None:
    if signum == signal.SIGTERM and signal.SIGTERM in received():
        # A second SIGTERM means "now": fall back to the default action.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    record(signum)


def install() -> None:
    """Catch SIGUSR2, and SIGTERM inside a job `instar submit` made (call once, from the main thread).

    Outside Slurm, SIGTERM keeps its default: torchrun sends it to the surviving ranks when one rank
    fails, and a rank that caught it would wait at its next collective for the dead one.
    """
    signal.signal(signal.SIGUSR2, _on_signal)
    if os.environ.get("INSTAR_REQUEUE_JOB"):
        signal.signal(signal.SIGTERM, _on_signal)
    arm()


def requeue_wanted() -> bool:
    """USR2 (the time limit is near, or someone asked) means "stop and come back": requeue. TERM alone
    means a cancel, the time limit itself, or a preemption Slurm requeues by itself: only stop."""
    return signal.SIGUSR2 in received()


def requeue_slurm_job() -> str | None:
    """Ask Slurm to requeue this job (it restarts from the top of its script and the stage resumes
    from its checkpoint). Returns what happened, or None when not in a job `instar submit` made
    (its script exports INSTAR_REQUEUE_JOB; an `instar run` inside someone's allocation is left alone)."""
    job = os.environ.get("INSTAR_REQUEUE_JOB")
    if not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not requeue job {job}: {exc}"
    if done.returncode != 0:
        return f"could not requeue job {job}: {(done.stderr or done.stdout).strip()}"
    return f"requeued job {job}"
