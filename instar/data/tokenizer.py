"""Tokenizers: the built-in character-level tokenizer and loading a saved one.

The character tokenizer is a real Hugging Face tokenizer (a `tokenizers` WordLevel model over
single characters wrapped in `PreTrainedTokenizerFast`), so everything downstream — chat templates,
assistant masks, `save_pretrained`/`AutoTokenizer.from_pretrained` — goes through the same code
paths as with any hub tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from instar.errors import DataError

CHAR_TOKENIZER_NAME = "instar-char"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"

# Ids are part of saved checkpoints' meaning: this order must never change.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))

# Roles render as one-letter prefixes; the assistant's content and its EOS sit inside a
# `{% generation %}` block so `return_assistant_tokens_mask=True` marks exactly what the model
# must learn to produce (TRL builds assistant-only losses from the same mask).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- 'S: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'Q: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'A: ' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('instar-char chat template: unknown role \"' + message['role'] + '\"; "
    "use one of system, user, assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'A: ' -}}{%- endif -%}"
)


def char_vocab() -> dict[str, int]:
    """The fixed vocabulary: 0..3 = <pad>, <bos>, <eos>, <unk>; 4 = "\\n"; 5..99 = ASCII 32..126."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def _char_backend() -> Tokenizer:
    """A `tokenizers.Tokenizer` giving one id per character and decoding by plain concatenation."""
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK_TOKEN))
    # `[\s\S]` rather than `.`: the regex dot does not match "\n", which must be its own token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the `instar-char` tokenizer (100 ids, see `char_vocab`) with its chat template.

    Encoding gives one id per character, adds no BOS/EOS by itself, and decode(encode(x)) == x for
    printable ASCII and "\\n"; other characters map to <unk>. The special-token strings inside a
    text (e.g. "<eos>" written by the chat template) encode to their single id.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_char_backend(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        # The default clean-up would turn "1 ." into "1." and break the decode round trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def resolve_tokenizer_dir(spec: str, base_dir: Path | None = None) -> Path:
    """The directory a non-builtin tokenizer spec names; relative paths are taken from base_dir."""
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def load_tokenizer(spec: str, base_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a recipe's `tokenizer` value.

    `"instar-char"` builds the character tokenizer; anything else is a local directory written by
    `save_pretrained` (relative to base_dir when given), loaded without touching the network.
    Raises DataError when the directory is missing or holds no loadable tokenizer.
    """
    if spec == CHAR_TOKENIZER_NAME:
        return build_char_tokenizer()
    path = resolve_tokenizer_dir(spec, base_dir)
    if not path.is_dir():
        relative = f" (a relative path is resolved against {base_dir})" if base_dir is not None else ""
        raise DataError(
            f"tokenizer '{spec}': no directory at {path}{relative}. Use '{CHAR_TOKENIZER_NAME}' for "
            "the built-in character tokenizer, or the path of a directory written by "
            "tokenizer.save_pretrained()."
        )
    if not (path / "tokenizer_config.json").is_file():
        raise DataError(
            f"tokenizer '{spec}': {path} holds no tokenizer_config.json; point it at a directory "
            f"written by tokenizer.save_pretrained(), or use '{CHAR_TOKENIZER_NAME}'."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(
            f"tokenizer '{spec}': could not load a tokenizer from {path} ({error}). The directory "
            "must hold the files save_pretrained() writes (tokenizer.json, tokenizer_config.json)."
        ) from error
