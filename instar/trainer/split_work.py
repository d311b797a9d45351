"""Work every rank does on its own contiguous slice of a list, then gathers in list order (the
reference log-prob cache, on-policy negatives): the wall time falls with the world size."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, size) of `rank`'s slice: equal sizes ceil(n / world); the last ones may run past
    `n` (the caller pads them where ranks must run equally many collectives) or be empty."""
    size = -(-n // world)
    return min(rank * size, n), size


def gather_objects(value, world: int) -> list:
    """Every rank's `value`, in rank order (one process: [value])."""
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def gather_rows(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Every rank's equally shaped `t`, concatenated in rank order on the CPU (through `device`:
    NCCL gathers device tensors only)."""
    if world == 1:
        return t
    t = t.to(device)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()
