import math

import pytest
import torch

from instar.errors import ContractError
from instar.merge.ops import check_compatible, task_arithmetic, weighted_average
from instar.trainer.schedule import lr_at


def test_average_and_task_arithmetic_closed_form():
    base = {"w": torch.tensor([1.0, 2.0])}
    a = {"w": torch.tensor([2.0, 2.0])}
    b = {"w": torch.tensor([1.0, 5.0])}
    assert torch.equal(weighted_average([a, b])["w"], torch.tensor([1.5, 3.5]))
    assert torch.allclose(weighted_average([a, b], [3, 1])["w"], torch.tensor([1.75, 2.75]))
    # θ0 + λ Σ (θi − θ0) = [1, 2] + 0.5 * ([1, 0] + [0, 3])
    assert torch.equal(task_arithmetic(base, [a, b], 0.5)["w"], torch.tensor([1.5, 3.5]))
    # with λ = 1/n, task arithmetic is the uniform average
    assert torch.equal(task_arithmetic(base, [a, b], 0.5)["w"], weighted_average([a, b])["w"])


def test_incompatible_states_are_refused():
    with pytest.raises(ContractError, match="shape"):
        check_compatible({"a": {"w": torch.zeros(2)}, "b": {"w": torch.zeros(3)}})
    with pytest.raises(ContractError, match="different parameters"):
        check_compatible({"a": {"w": torch.zeros(2)}, "b": {"v": torch.zeros(2)}})


def test_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(0, 10, 2.0, 0.0, 0.5) == pytest.approx(2.0)
