"""Stop requests a training loop obeys at its next step boundary (checkpoint, then stop).

Signal handlers (installed by the launcher: instar.launch.preempt) only record the signal here;
the loop asks `stop_requested(engine)` once per step, which all-reduces the flag so every rank
stops at the same step (a rank that stopped alone would leave the others waiting in a collective).
A torchrun stage's ranks are also asked through a file (STOP_FILE_ENV names it): `instar run`
writes the signal's name there, so a SIGTERM from torchrun itself (sent to the surviving ranks
when one fails) keeps its default action and never makes a rank wait for a dead one.
"""

from __future__ import annotations

import os
import signal

from instar.errors import InstarError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" — the stage is resumable, not failed
STOP_FILE_ENV = "INSTAR_STOP_FILE"

_armed = False
_received: list[int] = []


class Preempted(InstarError):
    """The stage saved a checkpoint and stopped because the scheduler (or a user) asked it to."""

    exit_code = PREEMPTED_EXIT
    label = "stopped"


class Interrupted(InstarError):
    """A second stop signal: stopped at once, without a checkpoint at this step."""

    label = "stopped"

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped at once on a second {name}; `instar run` resumes from the last complete "
                         f"checkpoint")
        self.exit_code = 128 + signum  # what a shell reports for a process the signal killed


def arm() -> None:
    """Handlers are installed: from now on the loop asks the ranks whether to stop."""
    global _armed
    _armed = True


def disarm() -> None:
    """Handlers removed (the end of an in-process `instar run`): forget what was received."""
    global _armed
    _armed = False
    _received.clear()


def record(signum: int) -> None:
    _received.append(signum)


def received() -> list[int]:
    return list(_received)


def _stop_file_says() -> str:
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return ""
    try:
        with open(path) as fh:
            return fh.read().strip() or "a stop request"
    except OSError:
        return ""


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else _stop_file_says()


def stop_requested(engine) -> bool:
    """True on every rank when any rank received a stop signal (or its stop file was written).
    Without handlers installed (a stage run outside `instar run`) this is always False and costs nothing."""
    if not _armed:
        return False
    return engine.all_reduce_sum(1.0 if _received or _stop_file_says() else 0.0) > 0
