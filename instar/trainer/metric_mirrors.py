"""Mirror metrics.jsonl and eval.jsonl records into TensorBoard and Weights & Biases (offline).

Recipe `logging:` (defaults or per stage) turns them on. Rank 0 alone writes; every value is tagged
`<stage>/<key>` at the stage's step, so one TensorBoard or W&B view holds the whole graph.
metrics.jsonl stays the source of truth (the report reads it); these are views of it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from instar.config.schema import LoggingConfig
from instar.errors import ContractError

INSTALL = "pip install 'instar[logging]'"  # or the exact pins: constraints.txt


def _require(module: str, package: str, field: str, stage: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ContractError(f"stage '{stage}': `{field}` needs the `{package}` package, which is not installed. "
                            f"Install it with `{INSTALL}` (or `pip install {package}`), or turn `{field}` off")


def check_available(cfg: LoggingConfig, stage: str) -> None:
    """Fail before training when a writer the recipe asks for cannot be imported (every rank calls it,
    so no rank waits at a barrier for one that failed)."""
    if cfg.tensorboard:
        _require("tensorboard", "tensorboard", f"stages.{stage}.logging.tensorboard", stage)
    if cfg.wandb is not None:
        _require("wandb", "wandb", f"stages.{stage}.logging.wandb", stage)


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers (bools as 0/1); strings and None are left out."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


class TensorBoardMirror:
    """Event files under `<run_dir>/tensorboard/<stage>/`: each stage shows as its own TensorBoard run,
    its scalars tagged `<stage>/<key>`."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        if resume_step is None:  # a fresh start: the earlier attempt's curves are not this run's
            shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard hides what an interrupted attempt logged after the checkpoint we
        # resume from, exactly as metrics.jsonl is rewound.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=(resume_step + 1) if resume_step else None)

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbMirror:
    """One offline W&B run per stage attempt under `<run_dir>/wandb/`, grouped by the run's name, with
    the stage's resolved config; `wandb sync <run_dir>/wandb/offline-run-*` uploads them later."""

    def __init__(self, run_dir: Path, stage: str, project: str, config: dict[str, Any], fingerprint: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=project, name=f"{run_dir.name}/{stage}", group=run_dir.name,
                              job_type=stage, dir=str(run_dir), mode="offline", config=config,
                              tags=[f"fingerprint:{fingerprint}"], reinit="create_new")

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricMirrors:
    """The writers a stage's `logging` asks for; a no-op on ranks other than 0 or when none is on."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, stage: str, *, main: bool, resume_step: int | None,
                 config: dict[str, Any], fingerprint: str):
        self.stage = stage
        self.writers: list[Any] = []
        if not main:
            return
        if cfg.tensorboard:
            self.writers.append(TensorBoardMirror(run_dir / "tensorboard" / stage, resume_step))
        if cfg.wandb is not None:
            self.writers.append(WandbMirror(run_dir, stage, cfg.wandb.project, config, fingerprint))

    def write(self, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl or eval.jsonl record (it must carry `step`)."""
        if not self.writers:
            return
        values = {f"{self.stage}/{key}": value for key, value in numeric(record).items()}
        for writer in self.writers:
            writer.write(int(record["step"]), values)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
