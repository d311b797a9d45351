"""Build a causal LM from an HF config mapping, or load one from a local HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from instar.errors import ContractError, RecipeError

ATTN_IMPLEMENTATION = "sdpa"

# instar draws its own progress; HF's per-file bars ("Loading weights", "Writing model shards")
# would interleave with it on every stage.
hf_logging.disable_progress_bar()


def model_from_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A freshly initialised model (seeded). `vocab_size` and special-token ids default to the
    tokenizer's; a given vocab_size smaller than the tokenizer is an error."""
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    vocab = len(tokenizer)
    cfg.setdefault("vocab_size", vocab)
    if cfg["vocab_size"] < vocab:
        raise RecipeError(f"model.config.vocab_size={cfg['vocab_size']} is smaller than the tokenizer's "
                          f"{vocab} tokens: raise it or drop it to use the tokenizer's size")
    for name in ("bos", "eos", "pad"):
        cfg.setdefault(f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"model.config: {exc}") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION,
                                             dtype=torch.float32)
    return model


def load_pretrained(path: Path) -> PreTrainedModel:
    """Load an HF causal LM from a local directory (a parent stage's artifact or `model.path`)."""
    if not (path / "config.json").is_file():
        raise ContractError(f"{path}: no HF model here (config.json missing)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                attn_implementation=ATTN_IMPLEMENTATION)
