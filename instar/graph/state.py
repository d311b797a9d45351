"""Run state on disk: per-stage `state.json`, and each stage's status for `instar status`.

A stage is `done` when its artifact is complete (DONE marker) and its fingerprint matches;
`running` while the process that started it is alive; `failed` when it raised or its process
died (e.g. SIGKILL, an OOM kill); `stopped` when a stop signal ended it (it resumes from its
checkpoint); `pending` otherwise. Stages queued on Slurm (`instar submit`)
take their state from Slurm, plus `cancelled` for a job that never ran (e.g. its parent failed).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from instar.models.export import read_meta, write_json_atomic

STATE = "state.json"


def write_state(stage_dir: Path, state: str, **extra: Any) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **extra}
    write_json_atomic(stage_dir / STATE, record)


def read_state(stage_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((stage_dir / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_status(stage_dir: Path, fingerprint: str) -> tuple[str, dict[str, Any]]:
    """(status, details) where status is done | running | failed | stopped | pending."""
    meta = read_meta(stage_dir / "model")
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return "done", meta
    state = read_state(stage_dir)
    if state.get("fingerprint") != fingerprint:
        return "pending", {}
    if state.get("executor") == "slurm":
        from instar.launch.slurm import stage_status_from_slurm

        return stage_status_from_slurm(state)
    if state.get("state") == "running":
        if state.get("host") == socket.gethostname() and not _alive(int(state.get("pid", -1))):
            return "failed", {**state, "error": "the process running it died (killed?); `instar run` resumes it"}
        return "running", state
    if state.get("state") in ("failed", "stopped"):
        return state["state"], state
    return "pending", state
