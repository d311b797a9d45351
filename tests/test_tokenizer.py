"""The instar-char tokenizer: fixed ids, round trips, chat template, assistant mask, save/load."""

import random
import string

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from instar.data.tokenizer import CHAR_TOKENIZER_NAME, build_char_tokenizer, load_tokenizer
from instar.errors import DataError

PRINTABLE = "\n" + "".join(chr(code) for code in range(32, 127))

CONVERSATION = [
    {"role": "system", "content": "add"},
    {"role": "user", "content": "12+34"},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "47+85"},
    {"role": "assistant", "content": "7+5+0=12|4+8+1=13|=132"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_pinned_ids(tokenizer):
    # These ids are baked into every checkpoint trained with instar-char: they must never move.
    pinned = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "\n": 4, " ": 5, "+": 16, "0": 21, "9": 30,
              "=": 34, "A": 38, "Q": 54, "S": 56, "|": 97, "~": 99}
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == 100 and len(vocab) == 100
    assert {token: vocab[token] for token in pinned} == pinned
    special_ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special_ids == (0, 1, 2, 3)


def test_one_id_per_character_and_round_trip(tokenizer):
    rng = random.Random(0)
    texts = [PRINTABLE, "12+34=46", "  leading and trailing  ", "a\n\nb", "1 . , ' \""]
    texts += ["".join(rng.choice(PRINTABLE) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == [tokenizer.get_vocab()[char] for char in text]  # no BOS/EOS added
        assert tokenizer.decode(ids) == text


def test_special_token_strings_are_single_tokens(tokenizer):
    assert tokenizer("<bos>1+1=2<eos>")["input_ids"] == [1, 22, 16, 22, 34, 23, 2]
    assert tokenizer.decode([1, 22, 2, 0], skip_special_tokens=True) == "1"


def test_unknown_characters_map_to_unk(tokenizer):
    assert tokenizer("é1")["input_ids"] == [3, 22]


def test_chat_template_rendering(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == ("<bos>S: add\nQ: 12+34\nA: 46<eos>\nQ: 47+85\nA: 7+5+0=12|4+8+1=13|=132<eos>\n")
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>Q: 12+34\nA: "


def test_generation_prompt_ids(tokenizer):
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert encoded["input_ids"] == [1, 54, 31, 5, 22, 16, 23, 4, 38, 31, 5]


def test_unknown_role_raises(tokenizer):
    with pytest.raises(TemplateError, match="unknown role \"tool\""):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _expected_assistant_mask(conversation: list[dict]) -> list[int]:
    """1 on each assistant content character and its <eos>, built independently of the template."""
    mask = [0]  # <bos>
    for message in conversation:
        prefix = {"system": "S: ", "user": "Q: ", "assistant": "A: "}[message["role"]]
        mask += [0] * len(prefix)
        if message["role"] == "assistant":
            mask += [1] * (len(message["content"]) + 1) + [0]  # content, <eos>, "\n"
        else:
            mask += [0] * (len(message["content"]) + 1)  # content, "\n"
    return mask


def _assistant_mask(tokenizer, conversation):
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return out["input_ids"], out["assistant_masks"]


def test_assistant_mask_marks_exactly_the_answers_and_eos(tokenizer):
    ids, mask = _assistant_mask(tokenizer, CONVERSATION)
    assert mask == _expected_assistant_mask(CONVERSATION)
    masked_text = tokenizer.decode([token for token, bit in zip(ids, mask) if bit])
    assert masked_text == "46<eos>7+5+0=12|4+8+1=13|=132<eos>"


def test_save_and_autotokenizer_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    special_tokens = (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token)
    assert special_tokens == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded(PRINTABLE)["input_ids"] == tokenizer(PRINTABLE)["input_ids"]
    assert loaded.decode(loaded(PRINTABLE)["input_ids"]) == PRINTABLE
    assert _assistant_mask(loaded, CONVERSATION) == _assistant_mask(tokenizer, CONVERSATION)


def test_load_tokenizer_builtin_and_relative_directory(tokenizer, tmp_path):
    assert load_tokenizer(CHAR_TOKENIZER_NAME).get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path / "saved")
    loaded = load_tokenizer("saved", base_dir=tmp_path)
    assert loaded("12+34=46")["input_ids"] == tokenizer("12+34=46")["input_ids"]
    assert load_tokenizer(str(tmp_path / "saved")).get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"no directory at .*missing.*instar-char"):
        load_tokenizer("missing", base_dir=tmp_path)


def test_load_tokenizer_directory_without_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer_config.json"):
        load_tokenizer(str(tmp_path / "empty"))


def test_digits_and_operators_are_in_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    assert all(char in vocab for char in string.digits + "+-*=|:QAS \n")
