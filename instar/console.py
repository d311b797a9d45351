"""What a person watching a run sees: a progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fmt_value(value, pct: bool = False) -> str:
    """A metric for a table: '-' when missing, a percentage, or 4 significant digits."""
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if key != "tok/s" else f"{key} {value:,.0f}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class StageProgress:
    """Per-stage progress: a rich bar on a TTY, a line every `every` steps otherwise."""

    def __init__(self, stage: str, total: int, start: int = 0, every: int = 10, quiet: bool = False):
        self.stage, self.total, self.every, self.quiet = stage, total, every, quiet
        self.tty = sys.stdout.isatty() and not quiet
        self._t0 = time.perf_counter()
        self._start = start
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{stage}[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 transient=False)
            self._task = self._bar.add_task(stage, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_fmt_metrics(metrics))
        elif step % self.every == 0 or step == self.total:
            console.print(f"[{self.stage}] step {step}/{self.total}  {_fmt_metrics(metrics)}", markup=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        console.print(message, markup=False)
