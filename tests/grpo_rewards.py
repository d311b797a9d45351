"""User reward functions for tests/test_grpo.py, named in recipes as `tests.grpo_rewards:<name>`."""


def ones(prompt: str, completion: str, answer: str) -> float:
    """The share of '1' characters: easy to learn, so a working GRPO must raise it quickly."""
    return completion.count("1") / max(len(completion), 1)


def raises(prompt: str, completion: str, answer: str) -> float:
    raise ValueError("reward server unavailable")


def not_a_number(prompt: str, completion: str, answer: str):
    return "high"
