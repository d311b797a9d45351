"""Which launcher started this process, and this process's place in the job.

Recognised: torchrun (torch.distributed.run), the `deepspeed` launcher, Slurm `srun` with one
task per rank, and a plain single process. Each sets different environment variables; this
module reads them once into a `LaunchEnv`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # torchrun | deepspeed | slurm | single
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
    value = env.get(key)
    return int(value) if value not in (None, "") else default


def detect(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's variables. torchrun is checked before the generic RANK/WORLD_SIZE of the
    deepspeed launcher, and both before Slurm (torchrun inside an sbatch job is still torchrun)."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", 0) or None
    if "TORCHELASTIC_RUN_ID" in env:
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "LOCAL_RANK"), _int(env, "WORLD_SIZE", 1),
                         env.get("MASTER_ADDR"), port)
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return LaunchEnv("deepspeed", _int(env, "RANK"), _int(env, "LOCAL_RANK"), _int(env, "WORLD_SIZE", 1),
                         env.get("MASTER_ADDR"), port)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"),
                         _int(env, "SLURM_NTASKS", 1), env.get("MASTER_ADDR"), port)
    return LaunchEnv("single", 0, 0, 1)
