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
    _perms: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.n > 0

    def _permutation(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            # this epoch's and the one before (a `peek` past an epoch's end computes the next early)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1} | {epoch: perm}
        if epoch == self.epoch:
            self._perm, self._perm_epoch = perm, epoch
        return perm

    def next(self) -> int:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = self._perm if self._perm_epoch == self.epoch else self._permutation(self.epoch)
        index = perm[self.pos]
        self.pos += 1
        return index

    def peek(self, k: int) -> list[int]:
        """What the next k calls of `next` would return, without drawing them."""
        epoch, pos, out = self.epoch, self.pos, []
        while len(out) < k:
            if pos >= self.n:
                epoch, pos = epoch + 1, 0
            chunk = self._permutation(epoch)[pos:pos + k - len(out)]
            out += chunk
            pos += len(chunk)
        return out

    def advance(self, k: int) -> None:
        """Draw k indices (as k calls of `next`) without returning them."""
        while k > 0:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            step = min(k, self.n - self.pos)
            self.pos, k = self.pos + step, k - step

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

    def peek(self, k: int) -> list[int]:
        """One source only: the indices the next k calls of `next` would draw from it."""
        assert len(self.sources) == 1, "peek draws from a one-source mixture"
        return self.sources[0].peek(k)

    def advance(self, k: int) -> None:
        """One source only: k calls of `next`, results unused."""
        assert len(self.sources) == 1, "advance draws from a one-source mixture"
        self.draws += k
        self.sources[0].advance(k)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for sampler, sub in zip(self.sources, state["sources"], strict=True):
            sampler.load_state_dict(sub)

