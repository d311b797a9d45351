"""Give a stage its tokenizer and its starting model, checking the contracts with its parents."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from instar.data.tokenizer import load_tokenizer
from instar.errors import ContractError
from instar.models.build import load_pretrained, model_from_config
from instar.models.swaps import apply_swaps
from instar.trainer.context import StageContext


def same_vocabulary(a, b) -> bool:
    """Same token ids and EOS: what a child stage needs to reuse its parent's embeddings."""
    return a.get_vocab() == b.get_vocab() and a.eos_token == b.eos_token


def stage_tokenizer(ctx: StageContext, needs_chat_template: bool):
    """The parent's tokenizer (every parent must share it), or the recipe's for a root stage.

    A stage may name its own tokenizer; it must then equal the parent's, since the parent's
    embeddings are indexed by the parent's vocabulary.
    """
    base_dir = ctx.loaded.base_dir
    if ctx.parents:
        tokenizers = {p: AutoTokenizer.from_pretrained(ctx.parent_model_dir(p), local_files_only=True)
                      for p in ctx.parents}
        first, tok = next(iter(tokenizers.items()))
        for other, other_tok in tokenizers.items():
            if not same_vocabulary(tok, other_tok):
                raise ContractError(f"stage '{ctx.name}': parents '{first}' and '{other}' use different "
                                    f"tokenizers; a stage's parents must share one vocabulary")
        if ctx.spec.tokenizer is not None:
            own = load_tokenizer(ctx.spec.tokenizer, base_dir)
            if not same_vocabulary(own, tok):
                raise ContractError(
                    f"stage '{ctx.name}': tokenizer '{ctx.spec.tokenizer}' differs from parent '{first}''s "
                    f"tokenizer ({len(own)} vs {len(tok)} tokens, or different ids); the parent's weights "
                    f"only fit its own vocabulary. Drop stages.{ctx.name}.tokenizer to inherit the parent's")
    else:
        tok = load_tokenizer(ctx.spec.tokenizer or ctx.loaded.recipe.model.tokenizer, base_dir)
    if tok.eos_token_id is None:
        raise ContractError(f"stage '{ctx.name}': the tokenizer has no EOS token; set one (eos_token) "
                            f"so generations and documents can end")
    if needs_chat_template and not tok.chat_template:
        raise ContractError(f"stage '{ctx.name}' ({ctx.spec.kind}) needs a tokenizer with a chat template; "
                            f"the tokenizer has none: add `chat_template` to its tokenizer_config.json")
    return tok


def stage_model(ctx: StageContext, tokenizer, causal_lm_loss: bool):
    """The policy a stage starts from: its (first) parent's artifact, `model.path`, or a fresh model,
    with the module swaps the stage asks for (`causal_lm_loss`: see `apply_swaps`)."""
    model_cfg = ctx.loaded.recipe.model
    if ctx.parents:
        model = load_pretrained(ctx.parent_model_dir(ctx.parents[0]))
    elif model_cfg.path is not None:
        path = Path(model_cfg.path)
        model = load_pretrained(path if path.is_absolute() else ctx.loaded.base_dir / path, "model.path")
    else:
        model = model_from_config(model_cfg.config, tokenizer, seed=ctx.loaded.recipe.run.seed)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ContractError(f"stage '{ctx.name}': the model's embedding has "
                            f"{model.get_input_embeddings().num_embeddings} rows but the tokenizer has "
                            f"{len(tokenizer)} tokens")
    apply_swaps(model, ctx.spec, ctx.name, causal_lm_loss)
    return model
