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
import time
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
    """Keyed by the reference's fingerprint, the pairs and the dtype the reference computes in (a
    bf16 stage's values are not an fp32 stage's)."""
    from instar.config.precision import precision_policy

    meta = read_meta(ctx.parent_model_dir(reference)) or {}
    key = json.dumps({"reference": meta.get("fingerprint"), "pairs": pairs_hash(examples),
                      "dtype": str(precision_policy(ctx.spec.precision).compute_dtype)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ctx.stage_dir / "reference_logps" / f"{reference}-{digest}.pt"


def pair_logps(model, examples: list, pad_id: int, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected) of each two-segment example under `model`."""
    from instar.data.packing import collate_rows
    from instar.methods.preference import segment_logps
    from instar.trainer.losses import forward_logits

    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = [[ex] for ex in examples[start:start + batch_size]]
            batch = collate_rows(rows, pad_id, max(len(r[0].input_ids) for r in rows)).to(device)
            chosen, rejected, _, _ = segment_logps(forward_logits(model, batch), batch)
            out.append(torch.stack([chosen, rejected], dim=-1).float().cpu())
    return torch.cat(out)


def cached_pair_logps(ctx, engine, reference: str, load_model, examples: list, pad_id: int) -> torch.Tensor:
    """The [N, 2] reference log-probs of `examples`, from the cache file or computed by every rank
    on its slice of the pairs and gathered (rank 0 writes the file); every rank returns them all."""
    from instar.console import say
    from instar.errors import ContractError
    from instar.trainer.split_work import gather_rows, rank_slice

    path = cache_path(ctx, reference, examples)
    if engine.all_reduce_sum(float(path.exists())) < ctx.world_size:  # one decision for every rank
        t0 = time.perf_counter()
        start, size = rank_slice(len(examples), ctx.rank, ctx.world_size)
        mine = examples[start:start + size]
        mine += [examples[0]] * (size - len(mine))  # padded: ZeRO-3 forwards are collectives
        model = load_model()
        loaded = time.perf_counter() - t0
        with engine.autocast():  # as the reference runs on the fly
            values = pair_logps(model, mine, pad_id, engine.device)
        values = gather_rows(values, ctx.world_size, engine.device)[:len(examples)]
        if ctx.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(values, tmp)
            os.replace(tmp, path)
        engine.barrier()  # the file is whole before any rank goes on (and may later read it)
        say(f"[{ctx.name}] reference log-probs of {len(examples)} pairs computed on {ctx.world_size} rank(s) in "
            f"{time.perf_counter() - t0:.2f} s ({loaded:.2f} s of it loading the reference)",
            ctx.quiet or ctx.rank != 0)
        return values
    values = torch.load(path, weights_only=True)
    if values.shape != (len(examples), 2):
        raise ContractError(f"{path}: holds {tuple(values.shape)} reference log-probs for {len(examples)} pairs "
                            f"(the file was changed after it was written); delete it and run the stage again "
                            f"to recompute it")
    return values
