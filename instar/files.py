"""File modes: what instar writes follows the process umask (tempfile and safetensors would make
it 0700 / 0600, which hides artifacts and data from the team on a shared cluster)."""

from __future__ import annotations

import os
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
