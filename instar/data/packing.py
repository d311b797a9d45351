"""Micro-batches from tokenised examples: packed rows without cross-document attention.

An example is (input_ids, targets) with targets already shifted: targets[i] is the token that
should follow input_ids[i], or -100 where no loss is taken. Packing never splits an example;
each packed document restarts its position ids and only attends within itself.
"""

from __future__ import annotations

import bisect
import itertools

import numpy as np
import torch

from instar.data.batch import Batch
from instar.data.example import IGNORE, Example, causal_example  # noqa: F401  (re-exported)


def block_diagonal_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: 0 where query i may attend key j (same document, j <= i),
    the dtype's minimum elsewhere. Padding (doc id -1) attends to itself so no row is empty.

    An additive float mask (not bool) is exact with both sdpa and eager attention.
    """
    t = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (same_doc & causal) | torch.eye(t, dtype=torch.bool, device=doc_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate_rows(rows: list[list[Example]], pad_id: int, length: int) -> Batch:
    """Lay out rows of examples (each row's examples end to end) as padded tensors of `length`,
    plus `one_document_per_row` (a bool: every row is one document from position 0)."""
    # Filled in numpy, one concatenation per row, and handed to torch at the end (no tensor ops per
    # document or row): rows of many short documents and memmap token shards stay fast.
    b = len(rows)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    targets = np.full((b, length), IGNORE, dtype=np.int64)
    position_ids = np.zeros((b, length), dtype=np.int64)
    doc_ids = np.full((b, length), -1, dtype=np.int64)
    # Whether attention needs the block-diagonal mask (see trainer.losses.attention_mask), decided
    # here on the host from the lengths: from the device copy it costs a sync before every forward.
    # The same predicate as there: each row's doc ids start at 0 and never rise.
    one_document_per_row = True
    for r, row in enumerate(rows):
        if not row:
            one_document_per_row = False
            continue
        ids = np.concatenate([ex.input_ids for ex in row])  # lists or shard views; widened on assignment
        lengths = np.array([n for ex in row for n in ex.lengths], dtype=np.int64)
        one_document_per_row = one_document_per_row and lengths.size > 0 and lengths[0] > 0 and not lengths[1:].any()
        ends = np.cumsum(lengths)
        starts = ends - lengths
        n = len(ids)
        input_ids[r, :n] = ids
        if all(ex.next_token_targets for ex in row):
            targets[r, :n - 1] = ids[1:]
            targets[r, ends - 1] = IGNORE  # each document's last token predicts nothing
        else:
            targets[r, :n] = np.concatenate([np.asarray(ex.targets, dtype=np.int64) for ex in row])
        position_ids[r, :n] = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
        doc_ids[r, :n] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    input_ids, targets, position_ids, doc_ids = map(torch.from_numpy, (input_ids, targets, position_ids, doc_ids))
    return Batch(input_ids, targets, position_ids, doc_ids, bool(one_document_per_row))


class Batcher:
    """Fills rows from a sampler over one or more example lists; a row is a list of examples.

    packing=True: each row of `seq_len` tokens holds as many whole examples as fit; an example
    that does not fit waits for the next row (it is part of the saved state). packing=False:
    one example per row. Over-long examples are cut to `seq_len` (counted in `truncated`).

    Every rank builds the same global stream of rows and takes its own slice (`step_rows`), so
    the data order depends on the global batch only, never on how many ranks share it: a run
    resumed on another world size sees exactly the rows it would have seen.
    """

    def __init__(self, sources: list[list[Example]], sampler, seq_len: int, packing: bool, pad_id: int):
        self.sources, self.sampler = sources, sampler
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self.pending: tuple[int, int] | None = None
        self.truncated = 0
        self._docs_per_row = 1.0  # documents a row held in the last call: picks the packing path

    def _take(self) -> tuple[tuple[int, int], Example]:
        from_pending = self.pending is not None
        key = self.pending if from_pending else self.sampler.next()
        self.pending = None
        ex = self.sources[key[0]][key[1]]
        if len(ex.input_ids) > self.seq_len:
            assert not ex.segments, "multi-document examples are length-checked by their kind"
            self.truncated += 0 if from_pending else 1
            ex = ex.truncated(self.seq_len)
        return key, ex

    def next_rows(self, n: int) -> list[list[Example]]:
        # Rows of many short documents from one token-shard source: packed with numpy (a Python step
        # per document is the bottleneck there; with a few long documents a row the plain loop is faster).
        if self.packing and self._docs_per_row >= 8 and self._one_shard_source():
            return self._pack_spans(n)
        rows: list[list[Example]] = []
        for _ in range(n):
            key, ex = self._take()
            row, used = [ex], len(ex.input_ids)
            while self.packing:
                key, ex = self._take()
                if used + len(ex.input_ids) > self.seq_len:
                    self.pending = key
                    break
                row.append(ex)
                used += len(ex.input_ids)
            rows.append(row)
        self._docs_per_row = count_examples(rows) / max(n, 1)
        return rows

    def _one_shard_source(self) -> bool:
        return (len(self.sources) == 1 and hasattr(self.sources[0], "spans") and hasattr(self.sampler, "peek")
                and len(self.sampler.sources) == 1)

    def _pack_spans(self, n: int) -> list[list[Example]]:
        """`next_rows` for one token-shard source: the same rows, the same draws, the same state,
        packed with numpy over the documents' lengths instead of a Python step per document."""
        if n == 0:
            return []
        source, seq_len = self.sources[0], self.seq_len
        carried = [] if self.pending is None else [self.pending[1]]
        want = int(n * self._docs_per_row * 1.25) + 8  # enough, usually: peeking too far costs time
        while True:
            indices = np.array(carried + self.sampler.peek(want), dtype=np.int64)
            shard, begin, end = source.spans(indices)
            lengths = np.minimum(end - begin, seq_len)
            filled = list(itertools.accumulate(lengths.tolist(), initial=0))
            bounds, pos = [0], 0
            for _ in range(n):
                # the longest run of documents from `pos` that fits (the first one always does);
                # the document after it is drawn and waits: it must be among those peeked
                pos = max(pos + 1, bisect.bisect_right(filled, filled[pos] + seq_len) - 1)
                if pos >= len(indices):
                    break
                bounds.append(pos)
            if len(bounds) == n + 1:
                break
            want *= 2
        self._docs_per_row = pos / n
        drawn = slice(len(carried), pos + 1)  # from the sampler this call: the rows' documents + the waiting one
        self.sampler.advance(drawn.stop - drawn.start)
        self.truncated += int((end[drawn] - begin[drawn] > seq_len).sum())
        self.pending = (0, int(indices[pos]))
        examples = source.examples(shard[:pos], begin[:pos], begin[:pos] + lengths[:pos])
        return [examples[a:b] for a, b in zip(bounds, bounds[1:])]

    def collate(self, rows: list[list[Example]]) -> Batch:
        length = self.seq_len if self.packing else max(sum(len(e.input_ids) for e in r) for r in rows)
        return collate_rows(rows, self.pad_id, length)

    def next_batch(self, n: int) -> Batch:
        return self.collate(self.next_rows(n))

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "pending": self.pending, "truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pending = tuple(state["pending"]) if state["pending"] is not None else None
        self.truncated = int(state["truncated"])


def count_examples(rows: list[list[Example]]) -> int:
    return sum(len(row) for row in rows)


def count_targets(rows: list[list[Example]]) -> int:
    return sum(ex.n_targets for row in rows for ex in row)


def count_tokens(rows: list[list[Example]]) -> int:
    return sum(len(ex.input_ids) for row in rows for ex in row)
