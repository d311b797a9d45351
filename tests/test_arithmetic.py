"""The arithmetic world: held-out honesty, formats, determinism, worked steps, answer extraction."""

import json
import random
import re

import pytest

from instar.data.arithmetic import (
    DEFAULT_SIZES,
    SPLITS,
    extract_answer,
    generate_rows,
    heldout_problems,
    is_heldout,
    worked_steps,
    write_arithmetic,
)
from instar.errors import DataError

TEXT_ROW = re.compile(r"(\d+)\+(\d+)=(\d+)")
STEP = re.compile(r"(\d)\+(\d)\+([01])=(\d{1,2})")


def _pair(expression: str) -> tuple[int, int]:
    a, b = expression.split("+")
    return int(a), int(b)


def _training_pairs(split: str, rows: list[dict]) -> list[tuple[int, int]]:
    """The (a, b) of each row, after checking the row's format and that its answer is right."""
    pairs = []
    for row in rows:
        if split in ("pretrain", "cpt"):
            assert set(row) == {"text"}
            a, b, total = map(int, TEXT_ROW.fullmatch(row["text"]).groups())
            assert total == a + b
        elif split == "dpo":
            assert set(row) == {"prompt", "chosen", "rejected"}
            a, b = _pair(row["prompt"])
            chosen, rejected = row["chosen"], row["rejected"]
            assert chosen == str(a + b) and len(rejected) == len(chosen) and rejected.isdigit()
            assert sum(x != y for x, y in zip(chosen, rejected)) == 1  # a near miss: one digit off
            assert not (len(rejected) > 1 and rejected[0] == "0")
        elif split == "prompts":
            assert set(row) == {"prompt", "answer"}
            a, b = _pair(row["prompt"])
            assert row["answer"] == str(a + b)
        else:
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant" and set(row) == {"messages"}
            a, b = _pair(user["content"])
            expected = str(a + b) if split == "sft" else worked_steps(a, b)
            assert assistant["content"] == expected
        pairs.append((a, b))
    return pairs


@pytest.fixture(scope="module")
def full_sets() -> dict[str, list[tuple[int, int]]]:
    """Every training split at its default size, as (a, b) pairs."""
    return {
        split: _training_pairs(split, generate_rows(split, DEFAULT_SIZES[split], seed=0))
        for split in SPLITS
        if split != "heldout"
    }


def test_heldout_rule():
    problems = heldout_problems()
    assert 400 <= len(problems) <= 600
    assert problems == sorted(problems)
    assert set(problems) == {(b, a) for a, b in problems}  # closed under commuting
    # Representative of the task, not one corner of it: every last digit of the sum, carries and
    # no carries, one- and two-digit operands all occur.
    assert {(a + b) % 10 for a, b in problems} == set(range(10))
    carries = sum((a % 10 + b % 10) >= 10 for a, b in problems) / len(problems)
    assert 0.3 < carries < 0.6
    assert any(a < 10 for a, b in problems) and any(a >= 10 and b >= 10 for a, b in problems)
    assert not is_heldout(100, 0) and not is_heldout(0, 120) and not is_heldout(-20, 0)


def test_no_training_split_contains_a_heldout_problem(full_sets):
    heldout = set(heldout_problems())
    for split, pairs in full_sets.items():
        assert len(pairs) == DEFAULT_SIZES[split]
        leaked = [pair for pair in pairs if pair in heldout or pair[::-1] in heldout]
        assert leaked == [], f"{split} leaks held-out problems {leaked[:5]}"


def test_operand_ranges(full_sets):
    for split in ("pretrain", "sft", "sft_steps"):
        operands = [x for pair in full_sets[split] for x in pair]
        assert min(operands) == 0 and max(operands) == 99
    cpt = full_sets["cpt"]
    assert all(max(pair) >= 100 and max(pair) <= 999 and min(pair) >= 0 for pair in cpt)
    assert min(x for pair in cpt for x in pair) < 100  # short operands still appear beside long ones


def test_pretrain_covers_the_training_problems_roughly_uniformly(full_sets):
    pairs = full_sets["pretrain"]
    allowed = 100 * 100 - len(heldout_problems())
    # 20000 uniform draws over 9500 problems hit ~1 - e^(-20000/9500) = 88 % of them.
    assert 0.85 * allowed < len(set(pairs)) < 0.91 * allowed


def test_heldout_split():
    rows = generate_rows("heldout", 0, seed=0)
    assert [_pair(row["prompt"]) for row in rows] == heldout_problems()
    assert all(row["answer"] == str(sum(_pair(row["prompt"]))) and set(row) == {"prompt", "answer"} for row in rows)
    assert generate_rows("heldout", 10, seed=5) == rows[:10]
    assert generate_rows("heldout", -1, seed=5) == rows


def test_determinism_and_seed_dependence():
    for split in SPLITS:
        assert generate_rows(split, 50, seed=3) == generate_rows(split, 50, seed=3)
    for split in ("pretrain", "cpt", "sft", "sft_steps"):
        assert generate_rows(split, 50, seed=3) != generate_rows(split, 50, seed=4)
    assert generate_rows("pretrain", 100, seed=3)[:10] == generate_rows("pretrain", 10, seed=3)
    # Same seed, different splits: different problem streams, not one stream in two formats.
    sft_pairs = _training_pairs("sft", generate_rows("sft", 50, seed=3))
    assert sft_pairs != _training_pairs("pretrain", generate_rows("pretrain", 50, seed=3))


def test_generation_leaves_global_random_state_alone():
    random.seed(123)
    state = random.getstate()
    generate_rows("pretrain", 100, seed=0)
    generate_rows("cpt", 100, seed=0)
    assert random.getstate() == state


def test_max_operand():
    pairs = _training_pairs("pretrain", generate_rows("pretrain", 500, seed=0, max_operand=9))
    assert all(max(pair) <= 9 for pair in pairs) and len(set(pairs)) > 50
    pairs = _training_pairs("sft", generate_rows("sft", 500, seed=0, max_operand=300))
    assert max(max(pair) for pair in pairs) > 99
    assert all(not is_heldout(a, b) for a, b in pairs)
    pairs = _training_pairs("cpt", generate_rows("cpt", 200, seed=0, max_operand=100))
    assert all(100 in pair and max(pair) == 100 for pair in pairs)


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="unknown split 'grpo'.*pretrain, cpt, sft, sft_steps, dpo, prompts, heldout"):
        generate_rows("grpo", 10, seed=0)
    with pytest.raises(DataError, match="max_operand >= 100"):
        generate_rows("cpt", 10, seed=0, max_operand=99)
    with pytest.raises(DataError, match="rows >= 0"):
        generate_rows("sft", -1, seed=0)


def test_worked_steps_examples():
    assert worked_steps(47, 85) == "7+5+0=12|4+8+1=13|=132"
    assert worked_steps(5, 123) == "5+3+0=8|0+2+0=2|0+1+0=1|=128"
    assert worked_steps(0, 0) == "0+0+0=0|=0"
    assert worked_steps(999, 1) == "9+1+0=10|9+0+1=10|9+0+1=10|=1000"


def _check_worked_steps(a: int, b: int, text: str) -> None:
    """Parse the steps back and check every column sum, every carry and the final answer."""
    *columns, final = text.split("|")
    assert len(columns) == max(len(str(a)), len(str(b)))
    carry, written = 0, []
    for index, column in enumerate(columns):
        x, y, c, s = map(int, STEP.fullmatch(column).groups())
        assert (x, y) == ((a // 10**index) % 10, (b // 10**index) % 10)
        assert c == carry and s == x + y + c
        written.append(s % 10)
        carry = s // 10
    assert final == f"={a + b}"
    rebuilt = int(str(carry) + "".join(map(str, reversed(written))))
    assert rebuilt == a + b


def test_worked_steps_are_correct_for_many_problems():
    rng = random.Random(7)
    problems = [(rng.randint(0, 10 ** rng.randint(1, 4)), rng.randint(0, 10 ** rng.randint(1, 4))) 
                for _ in range(2000)]
    problems += [(0, 0), (9, 1), (99, 1), (1, 999), (9999, 9999)]
    for a, b in problems:
        _check_worked_steps(a, b, worked_steps(a, b))
        assert extract_answer(worked_steps(a, b)) == str(a + b)


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("46", "46"),
        ("  46 \n", "46"),
        ("46\nQ: 1+1|=2", "46"),  # a new line is a new turn: the answer ended before it
        ("7+5+0=12|4+8+1=13|=132", "132"),
        ("7+5+0=12|4+8+1=13| = 132\n", "132"),
        ("7+5+0=12|4+8+1=13|132", "132"),
        ("-5", "-5"),
        ("", ""),
        ("abc", ""),
        ("46 apples", ""),
        ("7+5+0=12|4+8+", ""),  # cut off mid-steps: no answer, not "4"
        ("7+5+0=12|", ""),
        ("=46", ""),
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


def test_write_arithmetic(tmp_path):
    sizes = {"pretrain": 40, "cpt": 30, "sft": 20, "sft_steps": 10, "dpo": 10, "prompts": 10}
    paths = write_arithmetic(tmp_path / "data", seed=1, sizes=sizes)
    assert set(paths) == set(SPLITS)
    for split, path in paths.items():
        assert path == tmp_path / "data" / f"{split}.jsonl"
        raw = path.read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
        assert rows == generate_rows(split, sizes.get(split, 0), seed=1)
    assert len(paths["heldout"].read_text().splitlines()) == len(heldout_problems())
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)
    before = {split: path.read_bytes() for split, path in paths.items()}
    write_arithmetic(tmp_path / "data", seed=1, sizes=sizes)
    assert {split: path.read_bytes() for split, path in paths.items()} == before


def test_write_arithmetic_rejects_unknown_sizes(tmp_path):
    with pytest.raises(DataError, match="unknown split.*grpo.*valid splits"):
        write_arithmetic(tmp_path, sizes={"grpo": 10})
