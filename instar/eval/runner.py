"""Evaluate a stage's model as its `eval` section asks (exact-match accuracy on held-out problems)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instar.config.schema import EvalConfig
from instar.data.formats import PromptAnswerRow
from instar.data.jsonl import read_rows
from instar.data.sources import materialize
from instar.eval.exact_match import exact_match


class Evaluator:
    """`cfg` is the stage's resolved `eval` section; data paths are relative to `base_dir` (the
    recipe's folder) and generated data is written under `run_dir`."""

    def __init__(self, cfg: EvalConfig, tokenizer, base_dir: Path, run_dir: Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._rows: list[dict] | None = None
        self._base_dir, self._run_dir = base_dir, run_dir

    @property
    def enabled(self) -> bool:
        return self.cfg.exact_match is not None

    def _held_out(self) -> list[dict]:
        if self._rows is None:
            em = self.cfg.exact_match
            path = materialize(em.data, self._base_dir, self._run_dir)
            self._rows = read_rows(path, PromptAnswerRow, em.data.on_bad_row, em.max_rows).rows
        return self._rows

    def __call__(self, model, step: int) -> dict[str, Any]:
        """One eval record: {"step", "exact_match/<format>": accuracy, "n"}."""
        record: dict[str, Any] = {"step": step}
        em = self.cfg.exact_match
        if em is None:
            return record
        rows = self._held_out()
        for fmt in em.formats:
            result = exact_match(model, self.tokenizer, rows, fmt, batch_size=em.batch_size)
            record[f"exact_match/{fmt}"] = result["accuracy"]
            record["n"] = result["n"]
        return record
