"""Read JSONL rows with errors that name file:line, or skip bad rows and count them; write rows atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from instar.errors import DataError
from instar.files import umask_mode


@dataclass
class Rows:
    rows: list[dict]
    path: Path
    skipped: int = 0
    first_skip: str | None = None  # the first skipped row's problem, to report


def _problem(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "row"
        parts.append(f"{field}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def read_rows(path: Path, row_model: type[BaseModel], on_bad_row: str = "error",
              max_rows: int | None = None) -> Rows:
    """Parse `path` line by line, validating each row against `row_model`.

    Blank lines are ignored. A bad row raises DataError naming `path:line`, or with
    `on_bad_row="skip"` is dropped and counted.
    """
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check the stage's `data.path`; relative paths "
                        f"are resolved against the recipe's folder)")
    out = Rows(rows=[], path=path)
    with path.open("rb") as fh:  # decoded line by line: one bad byte is one bad row, not a crash
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    problem = f"expected a JSON object, got {type(obj).__name__}"
                else:
                    out.rows.append(row_model.model_validate(obj).model_dump())
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}; is this a binary file?)"
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
            except ValidationError as exc:
                problem = _problem(exc)
            if problem is not None:
                if on_bad_row == "error":
                    raise DataError(f"{path}:{line_no}: bad row: {problem}. Fix the row, or set "
                                    f"`data.on_bad_row: skip` to drop bad rows and count them")
                out.skipped += 1
                out.first_skip = out.first_skip or f"{path}:{line_no}: {problem}"
            if max_rows is not None and len(out.rows) >= max_rows:
                break
    if not out.rows:
        raise DataError(f"{path}: no usable rows (skipped {out.skipped}; first problem: {out.first_skip})")
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write rows as UTF-8 JSON lines ending in "\\n"; readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", newline="\n", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        os.chmod(handle.name, umask_mode(0o666))  # tempfile's 0600 would hide the data from the team
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
