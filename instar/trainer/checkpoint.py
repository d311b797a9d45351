"""Resumable checkpoints: engine state + loop state (step, tokens, data position) + every rank's
RNG states, written atomically.

Layout: `<stage>/checkpoints/step-00000100/` holding the engine's files, `loop.json` and
`rng_rank<k>.pt` (and `kind_rank<k>.pt` where the kind keeps state, `fp8_rank<k>.pt` where delayed
FP8 scaling keeps amax histories). Every rank writes into `.tmp-step-…`; rank 0 renames it into place
once all ranks are done, so a listed step is always complete.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from instar.models.export import remove_tree
from instar.models.fp8 import amax_histories, load_amax_histories

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
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _hf_model(engine) -> torch.nn.Module:
    return getattr(engine.model, "module", engine.model)  # a DeepSpeed engine wraps the HF model


def save_checkpoint(root: Path, step: int, engine, loop_state: dict[str, Any], keep: int,
                    kind_state: dict[str, Any] | None = None) -> None:
    """Write checkpoint `step` under `root` (every rank calls) and keep the newest `keep`.
    `kind_state` is this rank's state of the stage kind (e.g. an RL rollout being reused)."""
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if engine.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_tree(tmp)
        tmp.mkdir()
    engine.barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    if kind_state is not None:
        torch.save(kind_state, tmp / f"kind_rank{engine.rank}.pt")
    histories = amax_histories(_hf_model(engine))
    if histories:
        torch.save(histories, tmp / f"fp8_rank{engine.rank}.pt")
    engine.barrier()
    if engine.rank == 0:
        (tmp / "loop.json").write_text(json.dumps({**loop_state, "step": step}, indent=1))
        final = root / f"{PREFIX}{step:08d}"
        remove_tree(final)
        tmp.rename(final)
        for _, old in _step_dirs(root)[:-keep]:
            remove_tree(old)
    engine.barrier()


def latest_checkpoint(root: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint made for this stage's checkpoint key, with its loop state."""
    for _, path in reversed(_step_dirs(root)):
        try:
            state = json.loads((path / "loop.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("key") == key:
            return path, state
    return None


def load_rng(path: Path, rank: int) -> None:
    # RNG states are a ByteTensor and python ints in tuples: weights_only loading allows both.
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))


def load_kind_state(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / f"kind_rank{rank}.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def load_fp8_histories(path: Path, engine) -> None:
    """Delayed FP8 scaling's amax histories of this rank, where the checkpoint has them."""
    file = path / f"fp8_rank{engine.rank}.pt"
    if file.exists():
        load_amax_histories(_hf_model(engine), torch.load(file, weights_only=True))
