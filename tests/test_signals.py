"""SIGTERM (docker stop, a scheduler) and SIGINT (Ctrl-C) on a real `instar run`: the first
checkpoints the running stage at its next step boundary and stops (exit 75, state `stopped`,
shown by `instar status` and `instar report`), and the next `instar run` resumes it to the
weights of an uninterrupted run; a second signal stops at once. In one process and on 2
torchrun ranks (ZeRO-2)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_recipe, write_recipe

SINGLE = ["defaults.distributed.engine=single", "defaults.distributed.nproc_per_node=1"]
TWO_RANKS = ["defaults.distributed.engine=deepspeed", "defaults.distributed.zero_stage=2",
             "defaults.distributed.nproc_per_node=2"]


def _recipe(steps: int) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "cpt": recipe["stages"]["cpt"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps, "checkpoint_every": 0}  # only the stop saves
    recipe["stages"]["cpt"]["train"] = {"steps": 2}
    recipe["defaults"]["eval"] = {}
    return recipe


def _cli_with_sigint(handler: str) -> list[str]:
    """`python -c` running the CLI with SIGINT set first: a test runner started in the background
    passes SIGINT on ignored, a terminal's shell does not."""
    return ["-c", f"import signal, sys; signal.signal(signal.SIGINT, {handler}); "
                  f"from instar.cli import main; sys.exit(main(sys.argv[1:]))"]


class Run:
    """`instar run` as a subprocess whose output is read line by line as it comes."""

    def __init__(self, args: list[str], cwd: Path, python: list[str] = _cli_with_sigint("signal.default_int_handler")):
        self.proc = subprocess.Popen([sys.executable, *python, "run", *args], cwd=cwd, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, needle: str, timeout: float = 300) -> None:
        with self._seen:
            found = self._seen.wait_for(lambda: any(needle in x for x in self.lines) or self.proc.poll() is not None,
                                        timeout)
        assert found and any(needle in x for x in self.lines), f"never printed {needle!r}:\n{self.output}"

    def signal(self, signum: int) -> None:
        """SIGINT as Ctrl-C sends it (to the terminal's whole foreground process group), SIGTERM as
        `docker stop` or `kill` do (to the one process)."""
        if signum == signal.SIGINT:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def finish(self) -> int:
        code = self.proc.wait(timeout=300)
        self.wait_for("")  # the reader has drained the pipe
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _run(args: list[str], cwd: Path) -> str:
    run = Run(args, cwd)
    assert run.finish() == 0, run.output
    return run.output


def _wait_steps(run_dir: Path, steps: int, run: Run) -> None:
    metrics = run_dir / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert run.proc.poll() is None and time.time() < deadline, run.output
        time.sleep(0.02)


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage / "model" / "model.safetensors"))


def _state(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "state.json").read_text())


def _cli(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "instar.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _stop_resume_and_compare(tmp_path: Path, engine: list[str], signum: int) -> None:
    path = write_recipe(tmp_path, _recipe(steps=40))
    runs = tmp_path / "runs"
    _run([str(path), "--quiet", *engine, "run.name=reference"], tmp_path)

    run = Run([str(path), *engine, "run.name=stopped"], tmp_path)
    _wait_steps(runs / "stopped", 3, run)
    run.signal(signum)
    assert run.finish() == 75, run.output
    out = run.output
    found = re.search(r"stopped: stage 'pretrain': stopped at step (\d+) on " + signal.Signals(signum).name, out)
    assert found, out
    assert "Traceback" not in out, out
    step = int(found.group(1))
    assert step < 40
    checkpoints = sorted(p.name for p in (runs / "stopped" / "pretrain" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{step:08d}"], checkpoints
    assert _state(runs / "stopped", "pretrain")["state"] == "stopped"
    assert not (runs / "stopped" / "pretrain" / "stop-requested").exists()  # (torchrun's ranks read it)
    assert not (runs / "stopped" / "cpt" / "state.json").exists()  # nothing after the stopped stage started
    status = _cli(["status", str(runs / "stopped")])
    assert re.search(r"pretrain .* stopped .* stopped at step", status), status
    _cli(["report", str(runs / "stopped")])
    assert "stopped: stage &#x27;pretrain&#x27;: stopped at step" in (runs / "stopped" / "report.html").read_text()

    out = _run([str(path), *engine, "run.name=stopped"], tmp_path)
    assert f"resuming from step-{step:08d}" in out, out
    for stage in ("pretrain", "cpt"):
        want, got = _weights(runs / "reference", stage), _weights(runs / "stopped", stage)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), stage


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_checkpoints_one_process_and_the_rerun_ends_at_the_uninterrupted_weights(tmp_path: Path,
                                                                                                signum: int):
    _stop_resume_and_compare(tmp_path, SINGLE, signum)


@pytest.mark.dist
def test_sigterm_checkpoints_two_torchrun_ranks_and_the_rerun_ends_at_the_uninterrupted_weights(tmp_path: Path):
    _stop_resume_and_compare(tmp_path, TWO_RANKS, signal.SIGTERM)


def _stop_twice(tmp_path: Path, engine: list[str], signum: int, ready) -> Run:
    """Signal once when `ready(run)` returns, again once the first was taken: the run stops at
    once, before the next step boundary could save a checkpoint."""
    path = write_recipe(tmp_path, _recipe(steps=400))
    run = Run([str(path), *engine], tmp_path)
    ready(run)
    run.signal(signum)
    run.wait_for(f"[instar] {signal.Signals(signum).name}: stopping at the next step boundary")
    run.signal(signum)
    assert run.finish() == 128 + signum, run.output
    assert f"stopped: stopped at once on a second {signal.Signals(signum).name}" in run.output
    assert "Traceback" not in run.output, run.output
    run_dir = tmp_path / "runs" / "t"
    assert _state(run_dir, "pretrain")["state"] == "stopped"
    assert not list((run_dir / "pretrain").glob("checkpoints/step-*"))
    return run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_one_process_at_once(tmp_path: Path, signum: int):
    # Sent after the first step: a step of this model takes far longer than the gap between the signals.
    _stop_twice(tmp_path, [*SINGLE, "defaults.train.micro_batch_size=64", "defaults.train.seq_len=128",
                           "model.config.hidden_size=256", "model.config.intermediate_size=1024",
                           "model.config.num_hidden_layers=4"], signum,
                lambda run: _wait_steps(tmp_path / "runs" / "t", 1, run))


@pytest.mark.dist
def test_ctrl_c_twice_stops_two_torchrun_ranks_at_once(tmp_path: Path):
    # Sent while torchrun starts the ranks: they are seconds away from their first step boundary.
    run = _stop_twice(tmp_path, TWO_RANKS, signal.SIGINT, lambda run: run.wait_for("launcher: torchrun, 2 rank(s)"))
    for log in (tmp_path / "runs" / "t" / "pretrain" / "logs").glob("rank*.log"):
        pid = int(re.search(r"rank \d+/\d+ pid (\d+)", log.read_text()).group(1))
        with pytest.raises(ProcessLookupError):  # no rank outlives the run
            os.kill(pid, 0)
    assert run.proc.returncode == 128 + signal.SIGINT


def test_sigint_ignored_by_the_caller_stays_ignored(tmp_path: Path):
    """`instar run ... &` in a script starts it with SIGINT ignored: a Ctrl-C meant for the script
    must not stop the background run."""
    path = write_recipe(tmp_path, _recipe(steps=30))
    run = Run([str(path), *SINGLE], tmp_path, python=_cli_with_sigint("signal.SIG_IGN"))
    _wait_steps(tmp_path / "runs" / "t", 3, run)
    run.signal(signal.SIGINT)
    assert run.finish() == 0, run.output
    assert "stopping at the next step boundary" not in run.output
    assert _state(tmp_path / "runs" / "t", "cpt")["state"] == "done"


def test_a_signal_after_a_stages_last_step_lets_it_finish_and_starts_no_other(tmp_path: Path):
    """After the last step the loop no longer asks; the stage finishes (export, final eval of 300
    held-out problems: seconds) and `instar run` stops before the next stage instead."""
    recipe = _recipe(steps=6)
    recipe["defaults"]["eval"] = tiny_recipe()["defaults"]["eval"]
    recipe["defaults"]["eval"]["exact_match"]["data"]["generate"]["rows"] = 300
    path = write_recipe(tmp_path, recipe)
    run_dir = tmp_path / "runs" / "t"
    run = Run([str(path), *SINGLE], tmp_path)
    _wait_steps(run_dir, 6, run)
    run.signal(signal.SIGTERM)
    assert run.finish() == 75, run.output
    assert "stopped: stopped before stage 'cpt' on SIGTERM" in run.output, run.output
    assert _state(run_dir, "pretrain")["state"] == "done"
    assert (run_dir / "pretrain" / "model" / "DONE").exists()
    assert not (run_dir / "cpt" / "state.json").exists()
    out = _run([str(path), *SINGLE], tmp_path)
    assert "[pretrain] cached" in out and _state(run_dir, "cpt")["state"] == "done", out
