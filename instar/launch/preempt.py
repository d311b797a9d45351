"""Stop a stage cleanly when the scheduler asks: checkpoint at the next step boundary, exit with
PREEMPTED_EXIT, and (under Slurm) put the job back in the queue so it resumes from that checkpoint.

Under `instar run` (any executor but Slurm), `stop_on_signals` makes the first SIGTERM or SIGINT
stop at the next step boundary the same way (a torchrun stage's ranks learn it through their stop
file, instar.trainer.stop), and a second one stop at once.

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
import threading
from contextlib import contextmanager
from typing import Iterator

from instar.trainer.stop import (PREEMPTED_EXIT, Interrupted, Preempted, arm, disarm,  # noqa: F401  (the worker's API)
                                 received, record)


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


def _on_local_signal(signum, frame) -> None:
    if received():
        raise Interrupted(signum)  # the second signal: stop wherever the run is
    record(signum)
    name = signal.Signals(signum).name
    # os.write, not print: the handler may run while the main thread is inside a print to stderr.
    try:
        os.write(2, f"[instar] {name}: stopping at the next step boundary after a checkpoint; "
                    f"send it again to stop at once\n".encode())
    except OSError:  # SIGHUP: the terminal is gone
        pass


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """The `instar run` process: the first SIGTERM (docker stop, a scheduler), SIGINT (Ctrl-C) or
    SIGHUP (its terminal closed; torchrun, in its own process group, no longer hears it) asks the
    running stage to checkpoint and stop; a second raises Interrupted at once."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield
        return
    # A signal ignored already stays ignored (`instar run ... &` in a script ignores SIGINT).
    previous = {sig: signal.signal(sig, _on_local_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    arm()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        disarm()


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
