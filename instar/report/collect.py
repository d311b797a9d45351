"""Read a run directory into plain dataclasses for the report: the graph, each stage's status,
final metrics, and its metrics.jsonl / eval.jsonl logs (a line cut off by a crash is skipped and
counted, never fatal)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instar.errors import InstarError

# The eval keys: their final values come from eval.jsonl when the stage has no artifact yet.
EXACT_MATCH = ("exact_match/plain", "exact_match/chat")


@dataclass
class LogFile:
    """One JSONL log: its records (dicts only) and how many lines could not be read."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    cut_off: bool = False  # the last line is incomplete (no newline / not valid JSON): a crash mid-write

    @property
    def exists(self) -> bool:
        return self.path.is_file()


@dataclass
class StageReport:
    name: str
    kind: str
    parents: list[str]
    fingerprint: str
    status: str  # done | running | failed | stopped | pending (instar.graph.state.stage_status)
    depth: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics from model/instar.json (done only)
    error: str = ""
    metrics_log: LogFile | None = None
    eval_log: LogFile | None = None

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.metrics_log.records if self.metrics_log else []

    @property
    def evals(self) -> list[dict[str, Any]]:
        return self.eval_log.records if self.eval_log else []

    @property
    def cut_off(self) -> bool:
        return any(log is not None and log.cut_off for log in (self.metrics_log, self.eval_log))

    @property
    def died(self) -> bool:
        return self.status == "failed" and "died" in self.error

    @property
    def interrupted(self) -> bool:
        """Not finished, and stopped part-way: its process died, or a log ends in a cut-off line."""
        if self.status in ("done", "running", "stopped"):
            return False
        return self.died or self.cut_off

    @property
    def state(self) -> str:
        """What the report shows: stage_status's status, or `interrupted`."""
        return "interrupted" if self.interrupted else self.status

    def final(self, key: str) -> float | None:
        """A final value: the artifact's metrics when done, else the last logged value."""
        value = self.metrics.get(key)
        if number(value) is not None:
            return float(value)
        logs = self.evals if key in EXACT_MATCH else self.steps
        for record in reversed(logs):
            if number(record.get(key)) is not None:
                return float(record[key])
        return None

    @property
    def last_step(self) -> int | None:
        if number(self.metrics.get("steps")) is not None:
            return int(self.metrics["steps"])
        for record in reversed(self.steps):
            if number(record.get("step")) is not None:
                return int(record["step"])
        return None

    @property
    def seconds(self) -> float | None:
        for key in ("train_seconds", "merge_seconds"):
            if number(self.metrics.get(key)) is not None:
                return float(self.metrics[key])
        return None

    @property
    def has_eval(self) -> bool:
        return any(self.final(key) is not None for key in EXACT_MATCH)

    def notes(self) -> list[str]:
        """Short human notes on anything unusual about this stage."""
        out = []
        if self.interrupted:
            step = self.last_step
            out.append("interrupted" + (f" after step {step}" if step is not None else "")
                       + "; `instar run` resumes it")
        elif self.status == "failed" and self.error:
            out.append("failed: " + self.error.strip().splitlines()[-1][:200])
        elif self.status == "stopped":
            out.append("stopped: " + (self.error.strip().splitlines()[-1][:200] if self.error else "on a signal")
                       + "; `instar run` resumes it")
        elif self.status == "running":
            out.append("still running; curves show the steps logged so far")
        elif self.status == "pending":
            out.append("not run yet" + (" (logs are from an earlier attempt)" if self.steps else ""))
        for log in (self.metrics_log, self.eval_log):
            if log is not None and log.bad_lines:
                what = "its last line was cut off by a crash" if log.cut_off else "unreadable lines"
                out.append(f"{log.path.name}: {what}; {log.bad_lines} line(s) skipped")
        if not self.has_eval and self.status == "done":
            out.append("no eval for this stage")
        return out


@dataclass
class RunReport:
    run_dir: Path
    name: str
    recipe: str
    overrides: list[str]
    stages: list[StageReport]

    def stage(self, name: str) -> StageReport:
        return next(s for s in self.stages if s.name == name)

    def metric_keys(self) -> set[str]:
        """Every key with a numeric value in any stage's metrics.jsonl."""
        keys: set[str] = set()
        for s in self.stages:
            for record in s.steps:
                keys.update(k for k, v in record.items() if number(v) is not None)
        return keys


def number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools, strings, NaN and inf are not plotted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_log(path: Path) -> LogFile:
    """A JSONL log; lines that are not a JSON object are skipped and counted."""
    log = LogFile(path)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return log
    except OSError as exc:
        raise InstarError(f"{path}: cannot read ({exc.strerror})") from None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            log.records.append(record)
            continue
        log.bad_lines += 1
        if i == len(lines) - 1:
            log.cut_off = True
    return log


def _depths(stages: list[StageReport]) -> None:
    """Depth = longest path from a root (the graph's stages come in topological order)."""
    depth: dict[str, int] = {}
    for s in stages:
        s.depth = 1 + max((depth[p] for p in s.parents if p in depth), default=-1)
        depth[s.name] = s.depth


def collect(run_dir: Path) -> RunReport:
    """Everything the report shows, read from `run_dir` (raises InstarError when it is no run)."""
    from instar.graph.runner import load_graph
    from instar.graph.state import stage_status

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InstarError(f"{run_dir}: no such directory; give the folder <output_dir>/<run name> "
                          f"that `instar run` wrote")
    graph = load_graph(run_dir)
    stages = []
    for entry in graph["stages"]:
        name = entry["name"]
        fingerprint = str(entry.get("fingerprint", ""))
        stage_dir = run_dir / name
        status, details = stage_status(stage_dir, fingerprint)
        metrics = details.get("metrics") if status == "done" else None
        stages.append(StageReport(
            name=name, kind=str(entry.get("kind", "?")),
            parents=[str(p) for p in parents] if isinstance(parents := entry.get("parents"), list) else [],
            fingerprint=fingerprint, status=status,
            metrics=metrics if isinstance(metrics, dict) else {},
            error=str(details.get("error") or "") if status in ("failed", "stopped") else "",
            metrics_log=read_log(stage_dir / "metrics.jsonl"), eval_log=read_log(stage_dir / "eval.jsonl")))
    _depths(stages)
    recipe = str(graph.get("recipe", ""))
    overrides = [str(o) for o in graph.get("overrides") or []]
    return RunReport(run_dir=run_dir, name=run_dir.resolve().name, recipe=recipe, overrides=overrides,
                     stages=stages)
