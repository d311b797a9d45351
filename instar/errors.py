"""Errors a user can cause. Each says what went wrong, where, and how to fix it."""


class InstarError(Exception):
    """A user-facing error: the CLI prints the message (no traceback) and exits with 2."""

    exit_code = 2
    label = "error"  # the CLI's prefix: "error: <message>"


class RecipeError(InstarError):
    """The recipe is malformed: bad YAML, unknown key, wrong type, bad graph."""


class DataError(InstarError):
    """A data file is missing or a row is malformed."""


class ContractError(InstarError):
    """A stage's inputs do not fit it: tokenizer mismatch, missing base, missing parent artifact."""


class TrainingError(InstarError):
    """Training could not go on (e.g. too many non-finite steps in a row)."""
