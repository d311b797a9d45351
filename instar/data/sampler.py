"""Deterministic, rank-sharded, resumable samplers. Their state is a few integers.

Every random choice is a pure function of (seed, counters), so saving the counters and
restoring them reproduces the rest of the stream exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def _uniform(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, counter) (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


@dataclass
class EpochSampler:
    """Yields indices of `n` examples in a fresh seeded permutation each epoch.

    Every rank draws the same stream; ranks split the rows built from it (see `Batcher`), so
    the order never depends on the number of ranks.
    """

    n: int
    seed: int
    epoch: int = 0
    pos: int = 0
    _perm: list[int] | None = field(default=None, repr=False, compare=False)
    _perm_epoch: int = field(default=-1, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.n > 0

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
            self._perm, self._perm_epoch = perm, self.epoch
        return self._perm

    def next(self) -> int:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = self._perm if self._perm_epoch == self.epoch else self._permutation()
        index = perm[self.pos]
        self.pos += 1
        return index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


@dataclass
class MixtureSampler:
    """Draws (source, index) pairs: source s with probability weights[s], then its next example."""

    sources: list[EpochSampler]
    weights: list[float]
    seed: int
    draws: int = 0

    def __post_init__(self) -> None:
        total = float(sum(self.weights))
        assert total > 0 and len(self.weights) == len(self.sources)
        self._cumulative = []
        acc = 0.0
        for w in self.weights:
            acc += w / total
            self._cumulative.append(acc)

    def next(self) -> tuple[int, int]:
        if len(self.sources) == 1:  # nothing to choose (the draw counter still advances)
            self.draws += 1
            return 0, self.sources[0].next()
        u = _uniform(self.seed, self.draws)
        self.draws += 1
        source = next((i for i, c in enumerate(self._cumulative) if u < c), len(self.sources) - 1)
        return source, self.sources[source].next()

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for sampler, sub in zip(self.sources, state["sources"], strict=True):
            sampler.load_state_dict(sub)

