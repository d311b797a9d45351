"""Per-rank entry point: `python -m instar.graph.worker RUN_DIR STAGE` (started by torchrun).

Each rank logs to `<stage>/logs/rank<k>.log`; rank 0 also prints to the console. The stage is
re-planned from the recipe recorded in `RUN_DIR/graph.json` and must have the fingerprint
recorded there (the parent `instar run` planned it a moment ago).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
import warnings
from pathlib import Path


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return self.streams[0].isatty()

    def fileno(self) -> int:
        return self.streams[0].fileno()


def _log_to_file(log_dir: Path, rank: int, header: str) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"rank{rank}.log", "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
    log.write(header + "\n")
    if rank == 0:
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    else:  # everything, C-level output included, goes to this rank's file only
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout.reconfigure(line_buffering=True)  # a rank that dies keeps what it printed
    # A fatal signal (SIGABRT from a C++ thread, SIGSEGV) writes every thread's Python stack here.
    faulthandler.enable(file=log, all_threads=True)


def run(run_dir: Path, stage: str) -> int:
    from instar.config.load import load_recipe
    from instar.console import say
    from instar.errors import ContractError, InstarError
    from instar.graph.plan import make_plan
    from instar.launch import preempt
    from instar.launch.env import detect
    from instar.models.export import remove_leftovers
    from instar.trainer.context import StageContext, stage_folder
    from instar.trainer.kinds import get_kind

    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    env = detect()
    preempt.install()
    try:
        stage_dir = stage_folder(run_dir, stage)
    except InstarError as exc:  # a stage name from argv: nothing is written for it
        print(f"error (rank {env.rank}): {exc}", file=sys.stderr)
        return exc.exit_code
    _log_to_file(stage_dir / "logs", env.rank,
                 f"[{stage}] rank {env.rank}/{env.world_size} pid {os.getpid()} host {os.uname().nodename}")
    try:
        graph = json.loads((run_dir / "graph.json").read_text())
        if env.rank == 0:
            say(f"[{stage}] launcher: {env.launcher}, {env.world_size} rank(s)", graph.get("quiet", False))
        loaded = load_recipe(graph["recipe"], graph["overrides"])
        plan = {sp.name: sp for sp in make_plan(loaded)}
        recorded = {s["name"]: s["fingerprint"] for s in graph["stages"]}
        sp = plan[stage]
        if sp.fingerprint != recorded.get(stage):
            raise ContractError(f"stage '{stage}': the recipe changed after `instar run` planned it "
                                f"({recorded.get(stage)} -> {sp.fingerprint}); run `instar run` again")
        freed = remove_leftovers(stage_dir) if env.rank == 0 else None  # a Slurm job's first step
        if freed:
            say(f"[{stage}] {freed}", graph.get("quiet", False))
        ctx = StageContext(name=sp.name, spec=sp.spec, loaded=loaded,
                           fingerprint=sp.fingerprint, checkpoint_key=sp.checkpoint_key, parents=sp.parents,
                           data_paths=sp.data_paths, data_hashes=sp.data_hashes, rank=env.rank,
                           world_size=env.world_size, quiet=graph.get("quiet", False))
        get_kind(sp.kind)(ctx).run()
        return 0
    except preempt.Preempted as exc:
        # Every rank saved its part of the checkpoint; rank 0 puts the Slurm job back in the queue.
        requeued = preempt.requeue_slurm_job() if env.rank == 0 and preempt.requeue_wanted() else None
        print(f"[{stage}] rank {env.rank}: {exc}" + (f"; {requeued}" if requeued else ""), file=sys.stderr)
        return exc.exit_code
    except InstarError as exc:
        print(f"error (rank {env.rank}): {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException:
        print(f"rank {env.rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: left to exit-time destructors,
    gloo's threads sometimes abort the process ("terminate called without an active exception",
    SIGABRT) after the stage has finished."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_now(code: int) -> None:
    """Leave a finished stage without the interpreter's teardown. Even after destroy_process_group,
    a ZeRO-3 rank on CPU sometimes aborted in exit-time C++ destructors (SIGABRT with no Python frame
    on the main thread, caught by faulthandler in a CI run) after its stage was done; everything
    the stage wrote is closed and renamed into place by then, so only the streams need flushing."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    status = run(Path(sys.argv[1]), sys.argv[2])
    if status == 0:  # a failing rank exits normally: torchrun's report of which rank failed relies on it
        _exit_now(0)
    sys.exit(status)
