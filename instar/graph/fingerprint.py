"""Stage fingerprints: what a stage's artifact is a function of.

fingerprint = sha256(kind, name, resolved config, run seed, the parents' fingerprints,
the content hashes of every data file it reads, the global batch, and for root stages the model
section). Settings that only change how a run is observed (log cadence, `logging`) or laid out on ranks
(engine, ZeRO stage, ranks, accumulation for a fixed global batch) are left out: they change
float rounding, not what is computed.
"""

from __future__ import annotations

import hashlib
import json

from instar.config.schema import COSMETIC_SECTIONS, COSMETIC_TRAIN_FIELDS, TOPOLOGY_FIELDS, Recipe, StageSpec


def stage_fingerprint(name: str, spec: StageSpec, recipe: Recipe, parent_fingerprints: list[str],
                      data_hashes: list[str], global_batch: int | None) -> str:
    """With `global_batch=None` this is the stage's checkpoint key: what must match for a
    checkpoint to be resumed, whatever the ranks and batch layout."""
    config = spec.model_dump(mode="json")
    for field in COSMETIC_TRAIN_FIELDS:
        (config.get("train") or {}).pop(field, None)
    for field in TOPOLOGY_FIELDS:
        (config.get("distributed") or {}).pop(field, None)
    for section in COSMETIC_SECTIONS:
        config.pop(section, None)
    payload = {
        "global_batch": global_batch,
        "name": name,
        "config": config,
        "seed": recipe.run.seed,
        "parents": parent_fingerprints,
        "data": data_hashes,
        "model": recipe.model.model_dump(mode="json") if not spec.after else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
