from pathlib import Path

import pytest
import torch

from instar.data.formats import ChatRow, TextRow
from instar.data.jsonl import read_rows
from instar.data.packing import IGNORE, Batcher, causal_example, collate_rows
from instar.data.sampler import EpochSampler, MixtureSampler
from instar.data.tokenizer import build_char_tokenizer
from instar.errors import DataError
from instar.models.build import model_from_config
from tests.conftest import same_batch
from instar.data.chat import chat_examples
from instar.trainer.losses import forward_logits


def test_bad_row_names_file_and_line(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": 3}\n{oops\n')
    with pytest.raises(DataError, match=rf"{path}:3: bad row: text: Input should be a valid string"):
        read_rows(path, TextRow)
    rows = read_rows(path, TextRow, on_bad_row="skip")
    assert rows.rows == [{"text": "a"}] and rows.skipped == 2 and f"{path}:3" in rows.first_skip


def test_chat_row_needs_an_assistant_turn(tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r":1: bad row: messages: `messages` has no assistant turn"):
        read_rows(path, ChatRow)
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"messages.0.role"):
        read_rows(path, ChatRow)


def test_missing_file_and_empty_file(tmp_path: Path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl", TextRow)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_rows(tmp_path / "e.jsonl", TextRow)


def test_sampler_is_a_fresh_permutation_per_epoch():
    s = EpochSampler(10, seed=3)
    first, second = [s.next() for _ in range(10)], [s.next() for _ in range(10)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second and s.epoch == 1


def test_peek_and_advance_are_calls_of_next():
    """What the shard packer draws with: across epoch ends, from any state."""
    for k in (1, 6, 7, 23, 0):
        a, b = MixtureSampler([EpochSampler(7, 4)], [1.0], seed=2), MixtureSampler([EpochSampler(7, 4)], [1.0], seed=2)
        for _ in range(5):
            a.next(), b.next()
        peeked = a.peek(k)
        assert a.state_dict() == b.state_dict()  # peeking draws nothing
        assert peeked == [b.next()[1] for _ in range(k)]
        a.advance(k)
        assert a.state_dict() == b.state_dict() and [a.next() for _ in range(9)] == [b.next() for _ in range(9)]


def test_mixture_resumes_exactly():
    def make():
        return MixtureSampler([EpochSampler(7, 1), EpochSampler(5, 2)], [0.7, 0.3], seed=9)

    a = make()
    head = [a.next() for _ in range(13)]
    state = a.state_dict()
    tail = [a.next() for _ in range(20)]
    b = make()
    b.load_state_dict(state)
    assert [b.next() for _ in range(20)] == tail
    share = sum(src for src, _ in head + tail) / len(head + tail)
    assert 0.05 < share < 0.6


def test_batcher_state_includes_the_waiting_example():
    examples = [causal_example(list(range(1, n + 2))) for n in (3, 5, 7, 2, 6, 4, 8)]

    def make():
        return Batcher([examples], MixtureSampler([EpochSampler(len(examples), 0)], [1.0], 0), 12, True, 0)

    a = make()
    a.next_batch(2)
    state = a.state_dict()
    expected = [a.next_batch(2) for _ in range(3)]
    b = make()
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(2)
        assert same_batch(got, want)


@pytest.mark.parametrize("rows, one", [([[3], [5], [2]], True), ([[3], [2, 4]], False), ([[3], []], False),
                                       ([[64], [1]], True)])
def test_collate_decides_on_the_host_whether_rows_need_the_mask(rows, one):
    """The flag the loss uses instead of a device sync is the device predicate it replaced: every
    row's doc ids start at 0 and never rise (-1 is padding)."""
    batch = collate_rows([[causal_example(list(range(1, n + 1))) for n in row] for row in rows], 0, 64)
    doc_ids = batch.doc_ids
    assert batch.one_document_per_row is one
    assert bool(((doc_ids[:, 0] == 0).all() & (doc_ids[:, 1:] <= doc_ids[:, :-1]).all())) is one


def test_causal_example_masks_and_shifts():
    ex = causal_example([10, 11, 12, 13], loss_mask=[False, False, True, True])
    assert ex.targets == [IGNORE, 12, 13, IGNORE]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_one_by_one(attn):
    """Packing must not change any per-token prediction: no attention across documents, and
    positions restart per document."""
    tok = build_char_tokenizer()
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    model = model_from_config(cfg, tok, seed=0).eval()
    model.config._attn_implementation = attn
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("1+2", "3"), ("40+41", "81"), ("9+99", "108")]]
    examples = chat_examples(tok, convs, "assistant")
    packed = collate_rows([examples], tok.pad_token_id, 64)
    with torch.no_grad():
        logits = forward_logits(model, packed)[0]
        offset = 0
        for ex in examples:
            alone = forward_logits(model, collate_rows([[ex]], tok.pad_token_id, len(ex.input_ids)))[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(logits[offset: offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n


def _packed_conversations(tok, rows: int):
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("1+2", "3"), ("40+41", "81"), ("9+99", "108"), ("7+7", "14"), ("300+12", "312")]]
    examples = chat_examples(tok, convs, "assistant")
    per_row = [examples[:3], examples[3:]][:rows]
    return per_row, collate_rows(per_row, tok.pad_token_id, 48)


def test_flattened_rows_give_flash_attention_every_document_boundary():
    """With flash-attn, a packed batch runs as one row whose position ids restart per document;
    transformers derives flash-attn varlen's cu_seqlens from them. Those must be exactly the
    documents (and each padding token alone), row after row."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    from instar.models.attention import flatten_rows

    per_row, batch = _packed_conversations(build_char_tokenizer(), rows=2)
    input_ids, position_ids = flatten_rows(batch)
    assert input_ids.shape == position_ids.shape == (1, 2 * 48)
    assert torch.equal(input_ids.view(2, 48), batch.input_ids)
    assert _is_packed_sequence(position_ids, batch_size=1)
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    expected, start = [], 0
    for row in per_row:
        used = 0
        for ex in row:
            expected.append(start + used)
            used += len(ex.input_ids)
        expected += [start + p for p in range(used, 48)]  # padding: one-token sequences
        start += 48
    assert cu_seqlens.tolist() == expected + [2 * 48]


@pytest.mark.gpu
def test_packed_batch_equals_one_by_one_with_flash_attention():
    """The same check as above through flash-attn's varlen kernel (bf16, CUDA)."""
    pytest.importorskip("flash_attn")
    from instar.models.attention import FLASH, select_attention

    tok = build_char_tokenizer()
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    model = model_from_config(cfg, tok, seed=0).eval().to("cuda", torch.bfloat16)
    assert select_attention(model, torch.device("cuda"), "bf16-pure") == FLASH
    per_row, batch = _packed_conversations(tok, rows=2)
    with torch.no_grad():
        logits = forward_logits(model, batch.to(torch.device("cuda")))
        for r, row in enumerate(per_row):
            offset = 0
            for ex in row:
                alone = collate_rows([[ex]], tok.pad_token_id, len(ex.input_ids))
                want = forward_logits(model, alone.to(torch.device("cuda")))[0]
                n = len(ex.input_ids)
                torch.testing.assert_close(logits[r, offset:offset + n].float(), want.float(), atol=2e-2, rtol=2e-2)
                offset += n


def test_sft_truncation_policies():
    from instar.trainer.kinds.sft import fit_length

    tok = build_char_tokenizer()
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("1+2", "3"), ("40+41+1111+2222", "3414")]]
    short, long = chat_examples(tok, convs, "assistant")
    n = len(short.input_ids)
    assert len(long.input_ids) > n
    kept, over = fit_length([short, long], n, "keep_start", "s")
    assert over == 1 and kept[1].input_ids == long.input_ids[:n] and kept[1].targets[-1] == IGNORE
    assert kept[1].targets[:-1] == long.targets[:n - 1]
    kept, _ = fit_length([short, long], n, "keep_end", "s")
    assert kept[1].input_ids == long.input_ids[-n:] and kept[1].targets == long.targets[-n:]
    answer = [t for t in long.targets if t != IGNORE]
    assert [t for t in kept[1].targets if t != IGNORE] == answer  # the answer and its EOS survive
    assert fit_length([short, long], n, "drop", "s") == ([short], 1)
    with pytest.raises(DataError, match="conversation 2 is .* tokens, more than train.seq_len"):
        fit_length([short, long], n, "error", "s")
