"""Write a stage's artifact atomically: HF safetensors + config + tokenizer + instar.json.

The files go into a temporary folder beside the target, which is renamed into place; the
`DONE` marker is written last, so a folder with DONE is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from instar.errors import TrainingError
from instar.files import disk_full, follow_umask, free_bytes, mib

DONE = "DONE"
META = "instar.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# Left by a process killed mid-write or mid-delete: remove_tree's `.X.trash<pid>`, write_artifact's
# `.model.tmp…`, save_checkpoint's `.tmp-step-…`, write_json_atomic's `.X.tmp<pid>`.
LEFTOVER = re.compile(r"^\.(tmp-|.+\.trash\d*$|.+\.tmp)")


def remove_leftovers(stage_dir: Path) -> str | None:
    """Delete the leftovers of a killed attempt in a stage folder and its checkpoints (no process
    writes them while the stage's lock is held); what was freed, or None."""
    found = [p for folder in (stage_dir, stage_dir / "checkpoints") if folder.is_dir()
             for p in folder.iterdir() if LEFTOVER.match(p.name)]
    if not found:
        return None
    size = 0
    for path in found:
        files = [path] if not path.is_dir() else [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
        size += sum(f.lstat().st_size for f in files)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return f"removed {len(found)} leftover(s) of a killed run ({size / 2**20:.1f} MiB): " + ", ".join(
        sorted(p.name for p in found))


def remove_tree(path: Path) -> None:
    """Remove a folder by first renaming it away, so a crash never leaves a half-deleted one."""
    if path.exists():
        trash = path.with_name(f".{path.name}.trash{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash)


def check_finite(model, where: str) -> None:
    """Refuse weights holding inf or NaN: such an artifact would be cached as a finished stage."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype.itemsize == 1:
            tensor = tensor.float()  # isfinite has no FP8 kernel
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{where}: weight {name} holds inf or NaN values, so no artifact is written; "
                                f"the stage diverged: lower its train.lr or check its data (or its parents')")


def write_artifact(model_dir: Path, model, tokenizer, meta: dict[str, Any]) -> None:
    """Save `model` (HF PreTrainedModel) and `tokenizer` with `meta` as `model_dir`, atomically."""
    check_finite(model, f"stage '{meta.get('stage', model_dir.parent.name)}'")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp", dir=model_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / META, meta)
        follow_umask(tmp)
        remove_tree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException as exc:
        full = isinstance(exc, Exception) and disk_full(exc, tmp)  # before rmtree frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            raise TrainingError(f"stage '{meta.get('stage', model_dir.parent.name)}': exporting its model to "
                                f"{model_dir} filled the disk (the weights need about {mib(weights)}, "
                                f"{mib(free_bytes(model_dir.parent))} free); the partial export was removed: free space "
                                f"on that disk and run `instar run` again") from None
        raise
    (model_dir / DONE).write_text("ok\n")


def read_meta(model_dir: Path) -> dict[str, Any] | None:
    """The artifact's instar.json if the artifact is complete (DONE present), else None."""
    if not (model_dir / DONE).is_file():
        return None
    try:
        return json.loads((model_dir / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
