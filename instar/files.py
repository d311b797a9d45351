"""File modes: what instar writes follows the process umask (tempfile and safetensors would make
it 0700 / 0600, which hides artifacts and data from the team on a shared cluster); and telling a
full disk from other write errors."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def umask_mode(mode: int = 0o777) -> int:
    """`mode` as the process umask lets plain mkdir/open create it (tempfile ignores the umask:
    0700 / 0600, which hides artifacts from the team on a shared cluster)."""
    try:  # Linux says it; setting the umask to read it would race with other threads creating files
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes the umask allows (safetensors, like tempfile,
    writes 0600 files)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(umask_mode(0o777 if path.is_dir() else 0o666))


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.is_dir() else 0


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc`, raised while writing under `folder`, is its disk filling up. Only plain writes
    raise OSError(ENOSPC): safetensors says "os error 28", torch.save a bare RuntimeError ("unexpected
    pos"), which is told apart by the disk having (almost) nothing left."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "os error 28" in str(exc):
        return True
    return isinstance(exc, RuntimeError) and free_bytes(folder) < 1 << 20
