"""Per-stage evaluators."""
