"""Run one stage on its ranks with torchrun, and turn a failure into one clear message."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from instar.config.schema import DistributedConfig
from instar.errors import InstarError, RecipeError
from instar.trainer.stop import STOP_FILE_ENV, Preempted, received, signal_name


class StageFailed(InstarError):
    """A rank of a torchrun stage failed (raised, was killed, or could not start)."""


def torchrun_command(run_dir: Path, stage: str, dist: DistributedConfig, node_rank: int, run_id: str) -> list[str]:
    """The torchrun argument list for one stage (never a shell string)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    if dist.nnodes == 1 and dist.rdzv_endpoint is None:
        cmd += ["--standalone", "--nproc_per_node", str(dist.nproc_per_node)]
    else:
        cmd += ["--nnodes", str(dist.nnodes), "--node_rank", str(node_rank), "--nproc_per_node",
                str(dist.nproc_per_node), "--rdzv_backend", "c10d", "--rdzv_endpoint", str(dist.rdzv_endpoint),
                "--rdzv_id", run_id]
    return cmd + ["--max_restarts", "0", "-m", "instar.graph.worker", str(run_dir), stage]


def check_topology(stage: str, spec, node_rank: int) -> None:
    """Refuse, before launching, what cannot work on this machine or config."""
    import torch

    from instar.trainer.batch import batch_layout
    from instar.trainer.deepspeed_config import deepspeed_config

    dist = spec.distributed
    deepspeed_config(spec, batch_layout(spec.train, dist.world_size, stage), stage)

    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    kind = "GPUs" if torch.cuda.is_available() else "CPU cores"
    if dist.nproc_per_node > devices:
        raise RecipeError(f"stages.{stage}.distributed.nproc_per_node={dist.nproc_per_node} but this machine has "
                          f"{devices} {kind}; lower nproc_per_node")
    if dist.nnodes > 1 and dist.rdzv_endpoint is None:  # under Slurm, `instar submit` finds node 0 itself
        raise RecipeError(f"stages.{stage}.distributed: nnodes={dist.nnodes} needs `rdzv_endpoint: host:port` "
                          f"(node 0's address) for `instar run`; or queue it with `instar submit --executor slurm`")
    if node_rank >= dist.nnodes:
        raise RecipeError(f"--node-rank {node_rank} but the stage has nnodes={dist.nnodes}")
    if dist.rdzv_endpoint is not None and node_rank == 0:
        host, _, port = dist.rdzv_endpoint.rpartition(":")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host if host not in ("localhost", "") else "127.0.0.1", int(port)))
            except OSError as exc:
                raise RecipeError(f"stages.{stage}.distributed.rdzv_endpoint={dist.rdzv_endpoint}: port {port} "
                                  f"is not free on this host ({exc.strerror}); pick another port") from None


def _root_cause(stderr_tail: list[str]) -> tuple[str | None, str]:
    """(failing rank, what happened) from torchrun's failure summary."""
    text = "".join(stderr_tail)
    cause = text.split("Root Cause", 1)[-1] if "Root Cause" in text else text
    rank = re.search(r"rank\s*:\s*(\d+)", cause)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    what = "failed"
    if code:
        value = int(code.group(1))
        if value < 0:
            try:
                what = f"was killed by signal {-value} ({signal.Signals(-value).name})"
            except ValueError:
                what = f"was killed by signal {-value}"
        else:
            what = f"exited with code {value}"
    return (rank.group(1) if rank else None), what


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _wait(proc: subprocess.Popen, stop_file: Path) -> int:
    """torchrun's exit code; once this process received a stop signal, the ranks' stop file says so."""
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if received() and not stop_file.exists():
                stop_file.write_text(signal_name())


def run_stage_torchrun(run_dir: Path, stage: str, dist: DistributedConfig, node_rank: int, run_id: str) -> None:
    """Launch the stage's ranks and wait. Rank 0's output reaches the console; on failure raise
    StageFailed naming the rank, what happened to it, and its log."""
    cmd = torchrun_command(run_dir, stage, dist, node_rank, run_id)
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    # DeepSpeed JIT-builds a shared-memory comm op on CPU; keep its build cache per environment so
    # two virtualenvs never rebuild over each other (a build takes ~30 s).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    # A stop the user asks of `instar run` reaches the ranks through this file, not as a signal:
    # torchrun's SIGTERM to the ranks also means "a rank failed", where a rank must die at once.
    stop_file = run_dir / stage / "stop-requested"
    stop_file.unlink(missing_ok=True)
    env[STOP_FILE_ENV] = str(stop_file)
    # Its own process group: Ctrl-C in a terminal signals `instar run` alone, which asks the ranks.
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, process_group=0)
    tail: collections.deque[str] = collections.deque(maxlen=200)

    def pump() -> None:
        # Echo the ranks' stderr, but not torchrun's own traceback and failure box: StageFailed
        # says the same in one line (the box stays in `tail` to be parsed).
        held, echo = None, True
        for line in proc.stderr:
            tail.append(line)
            if held is not None:
                if "torchrun" in line or "torch/distributed/run.py" in line:
                    echo = False
                elif echo:
                    sys.stderr.write(held + line)
                held = None
            elif line.startswith("Traceback (most recent call last)"):
                held = line
            elif echo:
                sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = _wait(proc, stop_file)
    except BaseException:  # a second stop signal (Interrupted), or Ctrl-C before the handlers
        proc.terminate()  # torchrun passes SIGTERM on; the ranks keep its default action and die
        proc.wait()
        raise
    finally:
        stop_file.unlink(missing_ok=True)  # the ranks are gone: it must not stop the next attempt
    reader.join(timeout=5)
    if code == 0:
        return
    stopped = re.search(r"stage '.*': stopped at step \d+ on [^,\n]+, checkpoint saved", "".join(tail))
    if stopped and received():
        raise Preempted(stopped.group(0))
    logs = run_dir / stage / "logs"
    rank, what = _root_cause(list(tail))
    if rank is not None:
        log = logs / f"rank{rank}.log"
        raise StageFailed(f"stage '{stage}' failed: rank {rank} {what}. Its log: {log}\n"
                          f"--- last lines of {log.name} ---\n{_tail(log)}".rstrip())
    raise StageFailed(f"stage '{stage}' failed: torchrun exited with code {code} before any rank reported "
                      f"(see the output above and {logs}/)")
