"""Shared fixtures: a tiny recipe that trains in seconds, written into a temp folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

# Triton kernels run under Triton's interpreter on CPU; the switch only works if it is set before
# triton is first imported. On a CUDA machine the real kernels run (the `gpu` tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (and said so) without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

TINY = {
    "run": {"name": "t", "output_dir": "OUT", "seed": 0},
    "model": {
        "tokenizer": "instar-char",
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                   "tie_word_embeddings": True},
    },
    "defaults": {
        "train": {"micro_batch_size": 4, "seq_len": 64, "lr": 3e-3, "checkpoint_every": 5, "log_every": 5},
        "eval": {"exact_match": {"data": {"generate": {"task": "arithmetic", "split": "heldout", "rows": 16}},
                                 "formats": ["plain", "chat"]}},
    },
    "stages": {
        "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 500}},
                     "train": {"steps": 12}},
        "cpt": {"kind": "cpt", "after": ["pretrain"], "replay": 0.3,
                "data": {"generate": {"split": "cpt", "rows": 300}}, "train": {"steps": 6}},
        "sft": {"kind": "sft", "after": ["cpt"], "data": {"generate": {"split": "sft", "rows": 200}},
                "train": {"steps": 6}},
        "sft_steps": {"kind": "sft", "after": ["cpt"], "data": {"generate": {"split": "sft_steps", "rows": 200}},
                      "train": {"steps": 6, "seq_len": 128}},
        "merged": {"kind": "merge", "after": ["sft", "sft_steps"]},
    },
}


def tiny_recipe() -> dict:
    return copy.deepcopy(TINY)


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    recipe = copy.deepcopy(recipe)
    if recipe.get("run", {}).get("output_dir") == "OUT":
        recipe["run"]["output_dir"] = str(folder / "runs")
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, TINY)


def same_batch(a, b) -> bool:
    """Equal collated batches: their tensors, and collate_rows' one_document_per_row flag."""
    import dataclasses

    if type(a) is not type(b):
        return False
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)]
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)
