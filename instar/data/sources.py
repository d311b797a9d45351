"""Turn a stage's `data` spec into a file on disk, and hash file contents for fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from instar.config.schema import DataSpec


def generated_path(spec: DataSpec, run_dir: Path) -> Path:
    """Where a generator's output lives: keyed by the generator settings, so it is made once."""
    gen = spec.generate
    assert gen is not None
    key = hashlib.sha256(json.dumps(gen.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    return run_dir / "data" / f"{gen.task}-{gen.split}-{key}.jsonl"


def materialize(spec: DataSpec, base_dir: Path, run_dir: Path) -> Path:
    """The JSONL path (or token-shard folder) for `spec`, generating it into the run directory first if needed."""
    if spec.path is not None or spec.shards is not None:
        path = Path(spec.path if spec.path is not None else spec.shards)
        return path if path.is_absolute() else (base_dir / path)
    out = generated_path(spec, run_dir)
    if not out.is_file():
        from instar.data.arithmetic import DEFAULT_SIZES, generate_rows

        gen = spec.generate
        count = gen.rows or DEFAULT_SIZES.get(gen.split, 0)  # rows: 0 = the generator's default size
        rows = generate_rows(gen.split, rows=count, seed=gen.seed, max_operand=gen.max_operand)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, out)
    return out


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes (the data part of a stage's fingerprint)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
