"""Reference log-probs of every preference pair, computed once and kept on disk.

The reference model is frozen, so its summed log-probs of each pair's chosen and rejected
completions never change during a stage: computing them once (one no-grad pass over the data)
saves a forward per micro-batch. The file is keyed by the reference artifact's fingerprint and a
hash of the pairs' tokens, targets and segment layout — the pairs themselves, not the data file:
on-policy negatives replace the rejected answers after the data is read — so a changed reference
or pair never reuses stale values, and a re-run or resumed stage reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from instar.models.export import read_meta


def pairs_hash(examples: list) -> str:
    """sha256 of every example's input ids, targets and segment lengths, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.input_ids, ex.targets, list(ex.segments)]).encode())
    return digest.hexdigest()


def cache_path(ctx, reference: str, examples: list) -> Path:
    meta = read_meta(ctx.parent_model_dir(reference)) or {}
    key = json.dumps({"reference": meta.get("fingerprint"), "pairs": pairs_hash(examples)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ctx.stage_dir / "reference_logps" / f"{reference}-{digest}.pt"


def pair_logps(model, examples: list, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected) of each two-segment example under `model`."""
    from instar.data.packing import collate_rows
    from instar.trainer.engine import to_device
    from instar.trainer.preference import segment_logps
    from instar.trainer.losses import forward_logits

    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = [[ex] for ex in examples[start:start + batch_size]]
            batch = collate_rows(rows, pad_id, max(len(r[0].input_ids) for r in rows))
            batch = to_device(batch, next(model.parameters()).device)
            chosen, rejected, _, _ = segment_logps(forward_logits(model, batch), batch)
            out.append(torch.stack([chosen, rejected], dim=-1).float().cpu())
    return torch.cat(out)


def cached_pair_logps(ctx, engine, reference: str, load_model, examples: list, pad_id: int) -> torch.Tensor:
    """The [N, 2] reference log-probs of `examples`, from the cache file or computed by rank 0
    (the other ranks wait, then read the file)."""
    path = cache_path(ctx, reference, examples)
    if ctx.rank == 0 and not path.exists():
        values = pair_logps(load_model(), examples, pad_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(values, tmp)
        os.replace(tmp, path)
    engine.barrier()
    values = torch.load(path, weights_only=True)
    if values.shape != (len(examples), 2):
        raise RuntimeError(f"{path} holds {tuple(values.shape)} values for {len(examples)} pairs; delete it")
    return values
