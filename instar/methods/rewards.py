"""Reward functions for RL stages: a registry of built-ins plus user functions named `module:function`.

A reward function is `f(prompt: str, completion: str, answer: str) -> float`. The stage's reward
is the weighted sum of its functions. A function that raises or returns something that is not a
finite number stops the stage with the prompt's id (its row number) and the function's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Callable

from instar.data.arithmetic import extract_answer
from instar.errors import RecipeError, TrainingError
from instar.registry import Registry

RewardFn = Callable[[str, str, str], float]
REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("exact")
def exact_answer(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion's final number equals the answer, else 0."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


@REWARDS.register("format")
def answer_format(prompt: str, completion: str, answer: str) -> float:
    """1 when a number can be read off the completion at all (it finished with an answer), else 0."""
    return 1.0 if extract_answer(completion) != "" else 0.0


@REWARDS.register("reft")
def reft(prompt: str, completion: str, answer: str) -> float:
    """ReFT's partial credit: 1 correct, 0.1 an answer that is wrong, 0 no answer."""
    found = extract_answer(completion)
    return 1.0 if found == answer.strip() else (0.1 if found else 0.0)


def check_reward_name(name: str) -> str | None:
    """A problem with a reward's name, found without importing user code that may need torch."""
    if name in REWARDS:
        return None
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        return f"{REWARDS.problem(name)}, nor a user function written as `module:function`"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        return f"module '{module}' of reward '{name}' cannot be imported (is it on PYTHONPATH?)"
    return None


def load_reward(name: str) -> RewardFn:
    if name in REWARDS:
        return REWARDS[name]
    module_name, _, function = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"reward '{name}': {e}; give `module:function` of an importable function") from e
    if not callable(fn):
        raise RecipeError(f"reward '{name}' is not callable")
    return fn


class RewardModel:
    """The weighted sum of named reward functions, checked call by call."""

    def __init__(self, stage: str, names_and_weights: list[tuple[str, float]]):
        self.stage = stage
        self.parts = [(name, load_reward(name), weight) for name, weight in names_and_weights]

    def __call__(self, prompt_id: int, prompt: str, completion: str, answer: str) -> float:
        total = 0.0
        for name, fn, weight in self.parts:
            try:
                value = fn(prompt, completion, answer)
            except Exception as e:  # user code: report where, not a bare traceback
                raise TrainingError(f"stage '{self.stage}': reward '{name}' raised {type(e).__name__}: {e} "
                                    f"on prompt {prompt_id} ({prompt!r}, completion {completion!r})") from e
            if not isinstance(value, (int, float)) or not math.isfinite(value):  # bool counts as 0/1
                raise TrainingError(f"stage '{self.stage}': reward '{name}' returned {value!r} on prompt "
                                    f"{prompt_id} ({prompt!r}); a reward must be a finite number")
            total += weight * float(value)
        return total
