"""`instar report RUN_DIR`: one self-contained report.html for a run directory: the stage graph with
each stage's state and fingerprint, training curves, eval accuracy, and a table of final metrics."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from instar.errors import InstarError


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render `run_dir`'s report into `out` (default RUN_DIR/report.html); returns the path written."""
    from instar.report.collect import collect
    from instar.report.html import render

    run_dir = Path(run_dir)
    run = collect(run_dir)
    page = render(run)
    path = Path(out) if out is not None else run_dir / "report.html"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise InstarError(f"{path}: cannot write the report ({exc.strerror}); give --out a writable file") from None
    return path
