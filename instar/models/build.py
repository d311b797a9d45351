"""Build a causal LM from an HF config mapping, or load one from a local HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
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


def load_pretrained(path: Path, field: str | None = None) -> PreTrainedModel:
    """Load an HF causal LM from a local directory (a parent stage's artifact or `model.path`).

    Only safetensors weights are read: unpickling a `pytorch_model.bin` can run any code in it.
    `field` names the recipe field that points here (`model.path`), for the errors."""
    where = f"{field}: {path}" if field else str(path)
    if not (path / "config.json").is_file():
        raise ContractError(f"{where}: no HF model here (config.json missing)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(f"{where}/config.json: transformers {transformers.__version__} cannot read it "
                            f"({first}); fix config.json (an unknown `model_type` needs a transformers that "
                            f"has the architecture)") from None
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        if pickles:
            raise ContractError(f"{where}: only pickle weights ({', '.join(pickles)}); instar loads safetensors "
                                f"only, since unpickling can run code. Convert them once, where you trust the "
                                f"file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)")
        raise ContractError(f"{where}: no weights here (no .safetensors file); give a folder that "
                            f"save_pretrained wrote")
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                                    dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION)
    except SafetensorError as exc:
        files = ", ".join(sorted(p.name for p in path.glob("*.safetensors")))
        raise ContractError(f"{where}: corrupt or truncated weights in {files} ({exc}); copy or export "
                            f"the model again") from None
