"""Greedy exact match: batched == one-by-one, exact bookkeeping with a scripted model, speed, errors."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instar.data.arithmetic import generate_rows, worked_steps
from instar.data.tokenizer import build_char_tokenizer
from instar.errors import ContractError, DataError
from instar.eval.exact_match import encode_prompt, exact_match, greedy_generate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this file's tiny models on one intra-op thread, then restore the setting.

    A hidden-64 model gains nothing from a second thread, and on a busy 2-core machine the
    spinning OpenMP threads made this file ~15x slower (90 s instead of 6 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _llama(tokenizer, hidden: int, attention: str = "sdpa", init: float = 0.2) -> LlamaForCausalLM:
    """A seeded random Llama; init 0.2 (not 0.02) so greedy outputs differ from prompt to prompt."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=init,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_left_padded_equals_one_by_one(tokenizer, attention):
    model = _llama(tokenizer, hidden=64, attention=attention).eval()
    rng = random.Random(0)
    texts = ["".join(rng.choice("0123456789+=") for _ in range(rng.randint(1, 30))) for _ in range(20)]
    prompts = [[tokenizer.bos_token_id] + tokenizer.encode(text) for text in texts]
    stops = [tokenizer.eos_token_id]
    with torch.inference_mode():
        batched = greedy_generate(model, prompts, 12, stops, tokenizer.pad_token_id, batch_size=8)
        alone = [greedy_generate(model, [p], 12, stops, tokenizer.pad_token_id, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # Guard against a vacuous pass (e.g. a model that emits the same token whatever the prompt).
    assert len({tuple(ids) for ids in batched}) >= 15
    assert all(len(ids) <= 12 and tokenizer.eos_token_id not in ids for ids in batched)


def test_exact_match_does_not_depend_on_batch_size(tokenizer):
    model = _llama(tokenizer, hidden=64)
    rows = generate_rows("heldout", 30, seed=0)
    for prompt_format in ("plain", "chat"):
        one = exact_match(model, tokenizer, rows, prompt_format, batch_size=1, max_new_tokens=10)
        many = exact_match(model, tokenizer, rows, prompt_format, batch_size=7, max_new_tokens=10)
        assert one == many


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM that emits a fixed continuation for each known prompt.

    It checks, on every call, the attention-mask length and position ids a left-padded batch must
    carry, so the exact numbers exact_match reports can be asserted.
    """

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], filler: int, vocab_size: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.scripts, self.filler, self.vocab_size = scripts, filler, vocab_size
        self.prompts: list[tuple[int, ...]] = []
        self.step = 0

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        assert not torch.is_grad_enabled() and not self.training
        if cache is None:
            self.step = 0
            self.prompts = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
            for ids, mask, positions in zip(input_ids, attention_mask, position_ids):
                assert mask.tolist() == sorted(mask.tolist())  # left padding
                assert positions[mask.bool()].tolist() == list(range(int(mask.sum())))
        else:
            assert input_ids.shape[1] == 1 and cache == "scripted-cache"
            lengths = [len(prompt) for prompt in self.prompts]
            assert position_ids[:, 0].tolist() == [length - 1 + self.step for length in lengths]
            assert attention_mask.shape[1] == max(lengths) + self.step
        tokens = [self._token(prompt) for prompt in self.prompts]
        self.step += 1
        logits = torch.nn.functional.one_hot(torch.tensor(tokens), self.vocab_size).float()[:, None, :]
        return SimpleNamespace(logits=logits, cache="scripted-cache")

    def _token(self, prompt: tuple[int, ...]) -> int:
        script = self.scripts[prompt]
        return script[self.step] if self.step < len(script) else self.filler


def _scripted(tokenizer, prompts: dict[str, str]) -> ScriptedModel:
    """prompt text (as the model must see it, special tokens written out) -> continuation text."""
    scripts = {tuple(tokenizer.encode(prompt)): tokenizer.encode(text) for prompt, text in prompts.items()}
    return ScriptedModel(scripts, filler=tokenizer.convert_tokens_to_ids("9"), vocab_size=len(tokenizer))


def test_plain_scoring_is_exact(tokenizer):
    model = _scripted(tokenizer, {
        "<bos>1+2=": "3<eos>",
        "<bos>2+2=": "5<eos>",
        "<bos>10+5=": "15",  # never stops: runs to max_new_tokens with filler 9s
        "<bos>3+4=": "7\n1+1=2",  # a document ends at the newline
        "<bos>0+0=": "<eos>",
        "<bos>60+6=": "66<eos>",
    })
    problems = ["1+2", "2+2", "10+5", "3+4", "0+0", "60+6"]
    rows = [{"prompt": p, "answer": str(sum(map(int, p.split("+"))))} for p in problems]
    model.train()
    result = exact_match(model, tokenizer, rows, "plain")
    assert model.training  # restored
    assert (result["n"], result["correct"], result["accuracy"]) == (6, 3, 0.5)
    assert result["samples"] == [
        {"prompt": "1+2", "completion": "3", "answer": "3", "correct": True},
        {"prompt": "2+2", "completion": "5", "answer": "4", "correct": False},
        {"prompt": "10+5", "completion": "15999999", "answer": "15", "correct": False},
        {"prompt": "3+4", "completion": "7", "answer": "7", "correct": True},
        {"prompt": "0+0", "completion": "", "answer": "0", "correct": False},
    ]


def test_chat_scoring_is_exact(tokenizer):
    model = _scripted(tokenizer, {
        "<bos>Q: 47+85\nA: ": worked_steps(47, 85) + "<eos>",
        "<bos>Q: 5+123\nA: ": "5+3+0=8|0+2+0=2|0+1+0=1|=127<eos>",  # wrong final answer
        "<bos>Q: 12+34\nA: ": "46\nQ: 1+1",  # chat stops at <eos> only; the answer is the first line
        "<bos>Q: 1+1\nA: ": "2<eos>",
    })
    rows = [{"prompt": "47+85", "answer": "132"}, {"prompt": "5+123", "answer": 128},
            {"prompt": "12+34", "answer": "46"}, {"prompt": "1+1", "answer": "2"}]
    result = exact_match(model, tokenizer, rows, "chat")
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 3, 0.75)
    assert [sample["completion"] for sample in result["samples"]] == [
        "7+5+0=12|4+8+1=13|=132", "5+3+0=8|0+2+0=2|0+1+0=1|=127", "46\nQ: 1+1" + "9" * 39, "2"]
    assert [sample["correct"] for sample in result["samples"]] == [True, False, True, True]


def test_encode_prompt(tokenizer):
    assert encode_prompt(tokenizer, "12+34", "plain") == [1, 22, 23, 16, 24, 25, 34]
    assert encode_prompt(tokenizer, "12+34", "chat") == tokenizer.encode("<bos>Q: 12+34\nA: ")


def test_whole_heldout_set_scores_without_touching_grads(tokenizer):
    model = _llama(tokenizer, hidden=128, init=0.02)
    rows = generate_rows("heldout", 0, seed=0)
    result = exact_match(model, tokenizer, rows, "plain")
    assert result["n"] == len(rows) and 0 <= result["correct"] <= len(rows)
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_bad_inputs(tokenizer):
    model = _llama(tokenizer, hidden=64)
    rows = [{"prompt": "1+1", "answer": "2"}]
    with pytest.raises(DataError, match="unknown prompt_format 'qa'"):
        exact_match(model, tokenizer, rows, "qa")
    with pytest.raises(DataError, match="no rows"):
        exact_match(model, tokenizer, [], "plain")
    with pytest.raises(DataError, match="row 1 .*'prompt'"):
        exact_match(model, tokenizer, rows + [{"question": "1+1"}], "plain")
    with pytest.raises(DataError, match="max_new_tokens must be >= 1"):
        exact_match(model, tokenizer, rows, "plain", max_new_tokens=0)
    plain_only = build_char_tokenizer()
    plain_only.chat_template = None
    with pytest.raises(ContractError, match="chat template"):
        exact_match(model, plain_only, rows, "chat")
