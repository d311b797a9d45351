"""Resumable checkpoints: engine state + loop state (step, tokens, data position) + every rank's
RNG states, written atomically.

Layout: `<stage>/checkpoints/step-00000100/` holding the engine's files, `loop.json` and
`rng_rank<k>.pt` (and `kind_rank<k>.pt` where the kind keeps state, `fp8_rank<k>.pt` where delayed
FP8 scaling keeps amax histories). Every rank writes into `.tmp-step-…`; rank 0 renames it into place
once all ranks are done, so a listed step is always complete.

`manifest.json` holds every file's size and sha256 (the ranks hash a share of the files each, right
after writing, while they are in the page cache); a checkpoint whose files do not match is skipped
for the previous one on resume. Saving hashes each file once (a 1/world_size share per rank);
resuming reads the whole checkpoint once more on every rank before it is loaded, so all ranks reach
the same verdict without a process group (sha256: ~0.5 GB/s a core on the 2-core dev machine).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from instar.errors import TrainingError
from instar.files import disk_full, follow_umask, free_bytes, mib, tree_bytes
from instar.models.export import remove_tree
from instar.models.fp8 import amax_histories, load_amax_histories
from instar.models.wrapped import hf_model

PREFIX = "step-"
MANIFEST = "manifest.json"


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


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(".manifest"))


def _digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_manifest(tmp: Path, engine) -> None:
    """Every rank hashes its share of the files (all written by now); rank 0 joins the shares."""
    files = _files(tmp)
    share = {f: [(tmp / f).stat().st_size, _digest(tmp / f)] for f in files[engine.rank::engine.world_size]}
    (tmp / f".manifest_rank{engine.rank}.json").write_text(json.dumps(share))
    engine.barrier()
    if engine.rank == 0:
        joined: dict[str, list] = {}
        for k in range(engine.world_size):
            part = tmp / f".manifest_rank{k}.json"
            joined.update(json.loads(part.read_text()))
            part.unlink()
        (tmp / MANIFEST).write_text(json.dumps({"sha256": joined}, indent=1, sort_keys=True))


def save_checkpoint(root: Path, step: int, engine, loop_state: dict[str, Any], keep: int,
                    kind_state: dict[str, Any] | None = None) -> None:
    """Write checkpoint `step` under `root` (every rank calls) and keep the newest `keep`.
    `kind_state` is this rank's state of the stage kind (e.g. an RL rollout being reused).
    A full disk is a TrainingError saying how much space a checkpoint takes."""
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    try:
        _save(root, tmp, step, engine, loop_state, keep, kind_state)
    except Exception as exc:
        if not disk_full(exc, root):
            raise
        done = _step_dirs(root)
        need = (f"about {mib(tree_bytes(done[-1][1]))}, as {done[-1][1].name}" if done
                else f"more than the {mib(tree_bytes(tmp))} written when it filled")
        raise TrainingError(f"checkpoint {PREFIX}{step:08d}: the disk holding {root} is full ({mib(free_bytes(root))} "
                            f"free; a checkpoint needs {need}). The checkpoints already there are intact (the "
                            f"partial one is removed on the next run): free space on that disk and run `instar "
                            f"run` again to resume") from None


def _save(root: Path, tmp: Path, step: int, engine, loop_state: dict[str, Any], keep: int,
          kind_state: dict[str, Any] | None) -> None:
    if engine.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_tree(tmp)
        tmp.mkdir()
    engine.barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    if kind_state is not None:
        torch.save(kind_state, tmp / f"kind_rank{engine.rank}.pt")
    histories = amax_histories(hf_model(engine.model))
    if histories:
        torch.save(histories, tmp / f"fp8_rank{engine.rank}.pt")
    if engine.rank == 0:
        (tmp / "loop.json").write_text(json.dumps({**loop_state, "step": step}, indent=1))
    engine.barrier()
    _write_manifest(tmp, engine)
    if engine.rank == 0:
        follow_umask(tmp)  # engines may write files 0600 (as safetensors does)
        final = root / f"{PREFIX}{step:08d}"
        remove_tree(final)
        tmp.rename(final)
        for _, old in _step_dirs(root)[:-keep]:
            remove_tree(old)
    engine.barrier()


def verify(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (a file missing, cut short or changed), or None."""
    try:
        recorded = json.loads((path / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable (cut short, or written by an older instar)"
    extra = set(_files(path)) - set(recorded)
    if extra:
        return f"{sorted(extra)[0]} is not in its {MANIFEST}"
    for name, (size, digest) in sorted(recorded.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if _digest(file) != digest:
            return f"{name} differs from what was written (sha256 mismatch)"
    return None


def latest_checkpoint(root: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint made for this stage's checkpoint key, with its loop state. A
    damaged one is skipped for the one before it (said on stderr); if every one is damaged, fails."""
    damaged = []
    for _, path in reversed(_step_dirs(root)):
        try:
            state = json.loads((path / "loop.json").read_text())
        except (OSError, ValueError):
            state = {}
        state = state if isinstance(state, dict) else {}
        if state.get("key") not in (key, None):
            continue  # made for another configuration of this stage: never resumed
        problem = verify(path)
        if problem is None:
            return path, state
        damaged.append(path.name)
        print(f"warning: checkpoint {path} is damaged ({problem}); trying the one before it", file=sys.stderr)
    if damaged:
        raise TrainingError(f"every checkpoint of this stage under {root} is damaged ({', '.join(damaged)}); "
                            f"delete {root} to start the stage over")
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
        load_amax_histories(hf_model(engine.model), torch.load(file, weights_only=True))
