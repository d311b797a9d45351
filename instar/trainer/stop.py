"""Stop requests a training loop obeys at its next step boundary (checkpoint, then stop).

Signal handlers (installed by the launcher: instar.launch.preempt) only record the signal here;
the loop asks `stop_requested(engine)` once per step, which all-reduces the flag so every rank
stops at the same step (a rank that stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import signal

from instar.errors import InstarError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" — the stage is resumable, not failed

_armed = False
_received: list[int] = []


class Preempted(InstarError):
    """The stage saved a checkpoint and stopped because the scheduler (or a user) asked it to."""

    exit_code = PREEMPTED_EXIT


def arm() -> None:
    """Handlers are installed: from now on the loop asks the ranks whether to stop."""
    global _armed
    _armed = True


def record(signum: int) -> None:
    _received.append(signum)


def received() -> list[int]:
    return list(_received)


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else ""


def stop_requested(engine) -> bool:
    """True on every rank when any rank received a stop signal. Without handlers installed (a stage
    run in the `instar run` process) this is always False and costs nothing."""
    if not _armed:
        return False
    return engine.all_reduce_sum(1.0 if _received else 0.0) > 0
