"""Stage fingerprints: what a stage's artifact is a function of.

fingerprint = sha256(kind, name, resolved config, run seed, the parents' fingerprints,
the content hashes of every data file it reads, and for root stages the model section).
Settings that only change how a run is observed (log cadence) are left out.
"""

from __future__ import annotations

import hashlib
import json

from instar.config.schema import COSMETIC_TRAIN_FIELDS, Recipe, StageSpec


def stage_fingerprint(name: str, spec: StageSpec, recipe: Recipe, parent_fingerprints: list[str],
                      data_hashes: list[str]) -> str:
    config = spec.model_dump(mode="json")
    for field in COSMETIC_TRAIN_FIELDS:
        (config.get("train") or {}).pop(field, None)
    payload = {
        "name": name,
        "config": config,
        "seed": recipe.run.seed,
        "parents": parent_fingerprints,
        "data": data_hashes,
        "model": recipe.model.model_dump(mode="json") if not spec.after else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
