"""Memmap token shards: pretraining text tokenised once, read back without parsing or tokenising.

Layout of a shard folder (written by `instar data tokenize IN.jsonl OUT_DIR --tokenizer T`):

    index.json            {"format": "instar-token-shards", "version": 1, "dtype": "uint16" | "uint32",
                           "tokenizer": {"spec", "fingerprint", "vocab_size", "bos_id", "eos_id"},
                           "documents": D, "tokens": N, "source": {"path", "sha256"},
                           "shards": [{"tokens": "tokens-00000.bin", "offsets": "offsets-00000.bin",
                                       "documents": d, "n_tokens": n, "sha256": ...}, ...]}
    tokens-00000.bin      the documents' token ids back to back, little-endian `dtype`
    offsets-00000.bin     d + 1 little-endian uint64 token offsets: document j is tokens[o[j]:o[j+1]]

Each document is exactly what a pretrain/cpt stage makes of a `{"text"}` row: `[bos] + tokens + [eos]`
(no BOS when the tokenizer has none), so a stage reading shards trains on the same examples, packed
and sharded over ranks the same way, as one reading the JSONL. `dtype` is uint16 when every id fits
(vocabularies up to 65,536), else uint32. The folder is written under a temporary name and renamed,
so a reader never sees half of one. A stage's fingerprint hashes index.json, which holds each shard
file's sha256; a stage opening the shards checks every file's size against it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instar.data.example import IGNORE
from instar.data.sources import file_hash
from instar.errors import DataError

FORMAT = "instar-token-shards"
VERSION = 1
INDEX = "index.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def tokenizer_fingerprint(tokenizer) -> str:
    """What token ids mean: the vocabulary and the BOS/EOS ids (sha256, 16 hex digits)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
               "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# --- writing ---------------------------------------------------------------------------------------

class _ShardWriter:
    def __init__(self, folder: Path, dtype: str, shard_tokens: int):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        i = len(self.shards)
        self.entry = {"tokens": f"tokens-{i:05d}.bin", "offsets": f"offsets-{i:05d}.bin", "documents": 0,
                      "n_tokens": 0}
        self.fh = (self.folder / self.entry["tokens"]).open("wb")
        self.digest = hashlib.sha256()
        self.offsets = [0]

    def _close(self) -> None:
        self.fh.close()
        np.asarray(self.offsets, dtype="<u8").tofile(self.folder / self.entry["offsets"])
        self.entry["sha256"] = self.digest.hexdigest()
        self.shards.append(self.entry)

    def add(self, ids: np.ndarray) -> None:
        if self.entry["documents"] and self.entry["n_tokens"] + len(ids) > self.shard_tokens:
            self._close()
            self._open()
        data = ids.astype(self.dtype).tobytes()
        self.fh.write(data)
        self.digest.update(data)
        self.entry["documents"] += 1
        self.entry["n_tokens"] += len(ids)
        self.offsets.append(self.entry["n_tokens"])

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def _texts(path: Path, batch: int):
    """Batches of the `text` of each JSONL row; a bad row is an error naming path:line."""
    from instar.data.formats import TextRow
    from instar.data.jsonl import _problem
    from pydantic import ValidationError

    out = []
    with path.open("r", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: bad row: expected a JSON object, got {type(obj).__name__}")
                out.append(TextRow.model_validate(obj).text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: bad row: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValidationError as exc:
                raise DataError(f"{path}:{line_no}: bad row: {_problem(exc)}; every row needs a non-empty "
                                f"`text` string") from None
            if len(out) == batch:
                yield out
                out = []
    if out:
        yield out


def write_shards(in_path: Path, out_dir: Path, tokenizer, tokenizer_spec: str,
                 shard_tokens: int = 256 * 2**20, batch: int = 1024) -> dict[str, Any]:
    """Tokenise every `{"text"}` row of `in_path` into a shard folder at `out_dir`; returns its index."""
    in_path, out_dir = Path(in_path), Path(out_dir)
    if not in_path.is_file():
        raise DataError(f"{in_path}: no such file; give a JSONL file of {{\"text\": ...}} rows")
    if out_dir.exists():
        raise DataError(f"{out_dir}: already exists; remove it or choose another folder (shards are never "
                        f"overwritten in place: a stage may be reading them)")
    if shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be positive, got {shard_tokens}")
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    dtype = _dtype_for(vocab_size)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer '{tokenizer_spec}' has no EOS token: documents could not be told apart "
                        f"once packed; set its eos_token")
    prefix = [bos] if bos is not None else []
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        source_hash = file_hash(in_path)
        documents = 0
        for texts in _texts(in_path, batch):
            for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                writer.add(np.asarray(prefix + list(ids) + [eos], dtype=np.int64))
                documents += 1
        if documents == 0:
            raise DataError(f"{in_path}: no rows to tokenise")
        shards = writer.finish()
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype,
                 "tokenizer": {"spec": tokenizer_spec, "fingerprint": tokenizer_fingerprint(tokenizer),
                               "vocab_size": vocab_size, "bos_id": bos, "eos_id": eos},
                 "documents": documents, "tokens": sum(s["n_tokens"] for s in shards),
                 "source": {"path": str(in_path), "sha256": source_hash}, "shards": shards}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


# --- reading ---------------------------------------------------------------------------------------

class ArrayExample:
    """A pretraining document from a shard: the `Example` interface over a numpy array, so the
    Batcher packs it and `collate_rows` copies it without a Python loop over tokens."""

    __slots__ = ("input_ids",)
    segments = ()
    next_token_targets = True  # see Example: collate_rows shifts the row's ids instead of calling `targets`

    def __init__(self, ids: np.ndarray):
        self.input_ids = ids  # a read-only view of the shard (uint16/uint32); collate widens it once

    @property
    def targets(self) -> np.ndarray:
        out = np.empty(len(self.input_ids), dtype=np.int64)
        out[:-1] = self.input_ids[1:]
        out[-1] = IGNORE
        return out

    @property
    def lengths(self) -> tuple[int, ...]:
        return (len(self.input_ids),)

    @property
    def n_targets(self) -> int:
        return len(self.input_ids) - 1

    def truncated(self, length: int) -> "ArrayExample":
        return ArrayExample(self.input_ids[:length])  # its last token's target is IGNORE, as above


@dataclass
class _Shard:
    tokens: np.ndarray  # memmap
    offsets: np.ndarray  # uint64, documents + 1


class TokenShards:
    """A shard folder opened for reading: `len()` documents, `[i]` the i-th as an ArrayExample.
    Opening checks the index, the files' sizes and (with `check_tokenizer`) the tokenizer."""

    def __init__(self, folder: Path | str, max_documents: int | None = None):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        dtype = np.dtype(DTYPES[self.index["dtype"]]).newbyteorder("<")
        self.shards: list[_Shard] = []
        for entry in self.index["shards"]:
            tok_path, off_path = self.folder / entry["tokens"], self.folder / entry["offsets"]
            for p, want in ((tok_path, entry["n_tokens"] * dtype.itemsize), (off_path, (entry["documents"] + 1) * 8)):
                if not p.is_file():
                    raise DataError(f"{p}: missing; the shard folder {self.folder} is incomplete — tokenize "
                                    f"again with `instar data tokenize`")
                if p.stat().st_size != want:
                    raise DataError(f"{p}: {p.stat().st_size} bytes, but {INDEX} says {want} "
                                    f"({self.index['dtype']} tokens); the files do not belong to this index "
                                    f"or were cut short — tokenize again")
            # a plain ndarray view of the map: slicing a np.memmap makes a memmap per document (slow)
            tokens = np.asarray(np.memmap(tok_path, dtype=dtype, mode="r")) if entry["n_tokens"] else np.zeros(0, dtype)
            self.shards.append(_Shard(tokens, np.fromfile(off_path, dtype="<u8").astype(np.int64)))
        self._starts = [0]  # first global document index of each shard
        for shard in self.shards:
            self._starts.append(self._starts[-1] + len(shard.offsets) - 1)
        total = self._starts[-1]
        self.n = total if max_documents is None else min(total, max_documents)

    def check_tokenizer(self, tokenizer, where: str) -> None:
        want = self.index["tokenizer"]
        have = tokenizer_fingerprint(tokenizer)
        if have != want["fingerprint"]:
            raise DataError(f"{where}: {self.folder} was tokenized with '{want['spec']}' (fingerprint "
                            f"{want['fingerprint']}), but this stage's tokenizer has fingerprint {have}: "
                            f"the ids would mean other tokens. Tokenize again with this stage's tokenizer "
                            f"(`instar data tokenize IN.jsonl OUT_DIR --tokenizer ...`)")

    def __len__(self) -> int:
        return self.n

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = bisect.bisect_right(self._starts, i) - 1
        shard, j = self.shards[s], i - self._starts[s]
        return shard.tokens[shard.offsets[j]:shard.offsets[j + 1]]

    def __getitem__(self, i: int) -> ArrayExample:
        return ArrayExample(self.document(i))

    def spans(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, first token, end token) of each document in `indices`, without a Python step per
        document: what the Batcher packs many short documents with."""
        if indices.size and not (0 <= indices.min() and indices.max() < self.n):
            raise IndexError(f"document indices outside [0, {self.n})")
        if len(self.shards) == 1:
            offsets = self.shards[0].offsets
            return np.zeros(len(indices), np.int64), offsets[indices], offsets[indices + 1]
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        begin, end = np.empty(len(indices), np.int64), np.empty(len(indices), np.int64)
        for s in np.unique(shard).tolist():
            pick = shard == s
            j = indices[pick] - self._starts[s]
            begin[pick], end[pick] = self.shards[s].offsets[j], self.shards[s].offsets[j + 1]
        return shard, begin, end

    def examples(self, shard: np.ndarray, begin: np.ndarray, end: np.ndarray) -> list[ArrayExample]:
        """The documents `spans` described (ends may be cut short, as `ArrayExample.truncated` does)."""
        tokens = [s.tokens for s in self.shards]
        return [ArrayExample(tokens[s][b:e]) for s, b, e in zip(shard.tolist(), begin.tolist(), end.tolist())]


def read_index(folder: Path) -> dict[str, Any]:
    """index.json of a shard folder, checked; DataError saying what is wrong and how to fix it."""
    path = Path(folder) / INDEX
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such folder; `data.shards` names a folder written by "
                        f"`instar data tokenize IN.jsonl OUT_DIR`")
    if not path.is_file():
        raise DataError(f"{path}: missing; {folder} is not a token-shard folder (or its tokenize was cut short). "
                        f"Write one with `instar data tokenize IN.jsonl {folder}`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); tokenize again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path}: not an instar token-shard index (format should be '{FORMAT}')")
    if index.get("version") != VERSION:
        raise DataError(f"{path}: version {index.get('version')}; this instar reads version {VERSION}: tokenize again")
    if index.get("dtype") not in DTYPES:
        raise DataError(f"{path}: dtype {index.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    tok = index.get("tokenizer") or {}
    if isinstance(tok.get("vocab_size"), int) and tok["vocab_size"] > np.iinfo(DTYPES[index["dtype"]]).max + 1:
        raise DataError(f"{path}: dtype {index['dtype']} cannot hold ids of a {tok['vocab_size']}-token "
                        f"vocabulary (dtype mismatch); tokenize again")
    if not isinstance(index.get("shards"), list) or not index["shards"]:
        raise DataError(f"{path}: lists no shards; tokenize again")
    return index


def shards_hash(folder: Path) -> str:
    """The data part of a stage's fingerprint: sha256 of index.json (which holds every shard's sha256)."""
    read_index(folder)
    return hashlib.sha256((Path(folder) / INDEX).read_bytes()).hexdigest()
