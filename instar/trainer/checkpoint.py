"""Resumable checkpoints: engine state + loop state (step, tokens, sampler, RNG), atomically.

Layout: `<stage>/checkpoints/step-00000100/` holding the engine's files, `loop.json` and
`rng.pt`. Each is written into a temporary folder and renamed, so a listed step is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from instar.models.export import remove_tree

PREFIX = "step-"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        if child.name.startswith(PREFIX) and child.name[len(PREFIX):].isdigit():
            out.append((int(child.name[len(PREFIX):]), child))
    return sorted(out)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, step: int, engine, loop_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` under `root` and keep only the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        engine.save(tmp)
        (tmp / "loop.json").write_text(json.dumps({**loop_state, "step": step}, indent=1))
        torch.save(rng_state(), tmp / "rng.pt")
        final = root / f"{PREFIX}{step:08d}"
        remove_tree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _step_dirs(root)[:-keep]:
        remove_tree(old)
    return final


def latest_checkpoint(root: Path, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint made for this exact stage fingerprint, with its loop state."""
    for _, path in reversed(_step_dirs(root)):
        try:
            state = json.loads((path / "loop.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") == fingerprint:
            return path, state
    return None


def load_checkpoint(path: Path, engine) -> None:
    engine.load(path)
    # RNG states hold a python tuple (list after pickling) and a ByteTensor: both are allowed types.
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
