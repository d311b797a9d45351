"""DeepSpeed ZeRO 0-3 on 2 CPU ranks under torchrun: same numbers as one process, exact resume
after a rank is killed, restart on another world size, two nodes, and clear failures."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.dist


def _recipe(steps: int = 8, **train) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "sft": recipe["stages"]["sft"]}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["stages"]["pretrain"]["train"] = {"steps": steps, **train}
    recipe["stages"]["sft"]["train"] = {"steps": 3}
    recipe["defaults"]["eval"] = {}
    recipe["defaults"]["train"]["micro_batch_size"] = 4
    recipe["defaults"]["distributed"] = {"engine": "deepspeed", "zero_stage": 2, "nproc_per_node": 2}
    return recipe


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    repo = str(Path(__file__).resolve().parent.parent)  # user reward functions live in tests/
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "instar.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run(args: list[str], cwd: Path, code: int = 0) -> str:
    proc = _cli(args, cwd)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == code, out
    return out


def _losses(run_dir: Path, stage: str = "pretrain") -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


# Fields that time or measure this machine, not what was computed.
TIMING_FIELDS = {"tokens_per_s", "data_share", "peak_mem_mb", "mfu", "tflops", "mfu_fp8"}


def _computed_metrics(run_dir: Path, stage: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def _assert_same_metrics(two: Path, one: Path, stage: str, kind_fields: set[str]) -> None:
    """Every logged metric of every step equal on 2 ranks and on one process: means over the
    whole step, not rank 0's view."""
    got, want = _computed_metrics(two, stage), _computed_metrics(one, stage)
    assert len(got) == len(want) and got
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert g.keys() == w.keys(), (step, g.keys() ^ w.keys())
        assert kind_fields <= g.keys(), kind_fields - g.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-6), (step, key, g[key], w[key])


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / stage / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory):
    """The same stages in one process with the same global batch (8 rows)."""
    folder = tmp_path_factory.mktemp("single")
    path = write_recipe(folder, _recipe())
    _run(["run", str(path), "--quiet", "defaults.distributed.engine=single", "defaults.distributed.nproc_per_node=1",
          "defaults.train.micro_batch_size=8"], folder)
    return folder / "runs" / "t"


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_on_two_ranks_computes_what_one_process_does(tmp_path: Path, single_reference: Path, zero: int):
    path = write_recipe(tmp_path, _recipe())
    out = _run(["run", str(path), f"defaults.distributed.zero_stage={zero}"], tmp_path)
    assert "launcher: torchrun, 2 rank(s)" in out
    run_dir = tmp_path / "runs" / "t"
    assert _losses(run_dir) == pytest.approx(_losses(single_reference), rel=1e-5)
    for stage in ("pretrain", "sft"):  # sft loaded pretrain's export: ZeRO-3 shards gathered into HF files
        want, got = _weights(single_reference, stage), _weights(run_dir, stage)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)
    AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")
    assert (run_dir / "pretrain" / "logs" / "rank1.log").is_file()


def _kill_rank_after_checkpoint(args: list[str], cwd: Path, ckpt: Path, rank: int = 1) -> str:
    proc = _cli(args, cwd)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[0]
    log = ckpt.parent.parent / "logs" / f"rank{rank}.log"
    pid = int(re.search(rf"rank {rank}/\d+ pid (\d+)", log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out
    return out


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_killed_rank_fails_promptly_and_resume_is_exact(tmp_path: Path, zero: int):
    path = write_recipe(tmp_path, _recipe(steps=40, checkpoint_every=10))
    zero_arg = f"defaults.distributed.zero_stage={zero}"
    _run(["run", str(path), "--quiet", zero_arg, "run.name=reference"], tmp_path)

    ckpt = tmp_path / "runs" / "killed" / "pretrain" / "checkpoints" / "step-00000010"
    t0 = time.time()
    out = _kill_rank_after_checkpoint(["run", str(path), zero_arg, "run.name=killed"], tmp_path, ckpt)
    assert time.time() - t0 < 120
    assert "stage 'pretrain' failed: rank 1 was killed by signal 9 (SIGKILL)" in out
    assert "rank1.log" in out
    assert not (tmp_path / "runs" / "killed" / "pretrain" / "model").exists()

    out = _run(["run", str(path), zero_arg, "run.name=killed"], tmp_path)
    assert "resuming from step-" in out
    ref, got = tmp_path / "runs" / "reference", tmp_path / "runs" / "killed"
    assert _losses(got) == _losses(ref)
    for stage in ("pretrain", "sft"):
        want, have = _weights(ref, stage), _weights(got, stage)
        for key in want:
            assert torch.equal(want[key], have[key]), (stage, key)


def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path: Path):
    path = write_recipe(tmp_path, _recipe(steps=30, checkpoint_every=10, global_batch_size=8))
    _run(["run", str(path), "--quiet", "run.name=reference"], tmp_path)
    ckpt = tmp_path / "runs" / "moved" / "pretrain" / "checkpoints" / "step-00000010"
    _kill_rank_after_checkpoint(["run", str(path), "run.name=moved"], tmp_path, ckpt)

    # 2 ranks -> 1 rank: accumulation doubles, the global batch stays 8 rows
    out = _run(["run", str(path), "run.name=moved", "defaults.distributed.nproc_per_node=1"], tmp_path)
    assert "on 1 rank(s) instead of 2" in out
    ref, moved = _losses(tmp_path / "runs" / "reference"), _losses(tmp_path / "runs" / "moved")
    assert len(moved) == 30 and moved[:10] == ref[:10]
    # Adam's moments restart, the data and schedule do not: the loss goes on from where it was.
    assert moved[10] == pytest.approx(ref[10], rel=0.05)
    assert abs(sum(moved[20:]) - sum(ref[20:])) / sum(ref[20:]) < 0.05

    # without a fixed global batch, another world size is refused rather than silently changing it
    path2 = write_recipe(tmp_path, _recipe(steps=30, checkpoint_every=10), "nofix.yaml")
    ckpt = tmp_path / "runs" / "nofix" / "pretrain" / "checkpoints" / "step-00000010"
    _kill_rank_after_checkpoint(["run", str(path2), "run.name=nofix"], tmp_path, ckpt)
    out = _run(["run", str(path2), "run.name=nofix", "defaults.distributed.nproc_per_node=1"], tmp_path, code=2)
    assert "global batch of 8 rows (2 ranks); this run would use 4" in out
    assert "stages.pretrain.train.global_batch_size=8" in out


def test_one_rank_to_two(tmp_path: Path):
    path = write_recipe(tmp_path, _recipe(steps=20, checkpoint_every=10, global_batch_size=8))
    single = ["defaults.distributed.engine=single", "defaults.distributed.nproc_per_node=1"]
    proc = _cli(["run", str(path), "run.name=grow", *single], tmp_path)
    ckpt = tmp_path / "runs" / "grow" / "pretrain" / "checkpoints" / "step-00000010"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = _run(["run", str(path), "run.name=grow"], tmp_path)
    assert "on 2 rank(s) instead of 1" in out
    assert len(_losses(tmp_path / "runs" / "grow")) == 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_one_machine(tmp_path: Path, single_reference: Path):
    path = write_recipe(tmp_path, _recipe())
    args = ["run", str(path), "--quiet", "defaults.distributed.nproc_per_node=1", "defaults.distributed.nnodes=2",
            f"defaults.distributed.rdzv_endpoint=localhost:{_free_port()}"]
    node0 = _cli([*args, "--node-rank", "0"], tmp_path)
    time.sleep(1.0)
    node1 = _cli([*args, "--node-rank", "1"], tmp_path)
    out0, out1 = node0.communicate(timeout=600)[0], node1.communicate(timeout=600)[0]
    assert node0.returncode == 0 and node1.returncode == 0, out0 + out1
    run_dir = tmp_path / "runs" / "t"
    assert _losses(run_dir) == pytest.approx(_losses(single_reference), rel=1e-5)
    for key, value in _weights(single_reference, "sft").items():
        torch.testing.assert_close(_weights(run_dir, "sft")[key], value, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("override,needle", [
    ("defaults.distributed.nproc_per_node=64", "nproc_per_node=64 but this machine has"),
    ("defaults.train.global_batch_size=10", "global_batch_size=10 is not divisible by micro_batch_size 4 x 2 ranks"),
    ("defaults.distributed.zero_stage=4", "defaults.distributed.zero_stage: Input should be less than or equal to 3"),
    ("defaults.distributed.deepspeed_config={gradient_clip: 1}", "gradient_clip: not a DeepSpeed config key; did you mean 'gradient_clipping'?"),
    ("defaults.distributed.deepspeed_config={train_micro_batch_size_per_gpu: 2}", "train_micro_batch_size_per_gpu=2 contradicts the recipe, which gives 4"),
])
def test_bad_distributed_settings(tmp_path: Path, override: str, needle: str):
    path = write_recipe(tmp_path, _recipe())
    out = _run(["run", str(path), override], tmp_path, code=2)
    assert needle in out and "Traceback" not in out
    assert not (tmp_path / "runs" / "t" / "pretrain" / "model").exists()


def test_port_in_use(tmp_path: Path):
    path = write_recipe(tmp_path, _recipe())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = _run(["run", str(path), "defaults.distributed.nnodes=2", "defaults.distributed.nproc_per_node=1",
                    f"defaults.distributed.rdzv_endpoint=localhost:{port}"], tmp_path, code=2)
    assert f"port {port} is not free" in out


def test_a_rank_that_raises_is_named_with_its_log(tmp_path: Path):
    path = write_recipe(tmp_path, _recipe(steps=20, lr=1e12, warmup_ratio=0, max_bad_steps=2))
    out = _run(["run", str(path)], tmp_path, code=2)
    assert re.search(r"stage 'pretrain' failed: rank [01] exited with code 2\. Its log: .*rank[01]\.log", out)
    assert "non-finite loss or gradient" in out
    assert not (tmp_path / "runs" / "t" / "pretrain" / "model").exists()


def test_bf16_on_zero2(tmp_path: Path):
    """bf16 means fp32 weights and a bf16-autocast forward on both engines (not DeepSpeed's bf16
    module with fp32 masters): the same micro-batches give one process's losses."""
    recipe = _recipe(steps=4, global_batch_size=8)
    recipe["stages"]["sft"]["train"]["global_batch_size"] = 8
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet", "defaults.precision=bf16", "run.name=one", "defaults.distributed.engine=single",
          "defaults.distributed.nproc_per_node=1"], tmp_path)
    _run(["run", str(path), "--quiet", "defaults.precision=bf16", "run.name=two"], tmp_path)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    for stage in ("pretrain", "sft"):
        # 1e-4: bf16 rounds the fp32 weights, which differ in the last bits (reduction order); the
        # weights are not compared, Adam turns such noise on near-zero gradients into steps of ~lr.
        assert _losses(two, stage) == pytest.approx(_losses(one, stage), rel=1e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_dpo_on_two_ranks_computes_what_one_process_does(tmp_path: Path, zero: int):
    recipe = _recipe(steps=3)
    recipe["stages"]["dpo"] = {"kind": "dpo", "after": ["sft"], "nll_coef": 0.1,
                               "data": {"generate": {"split": "dpo", "rows": 64}}, "train": {"steps": 3}}
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet", "run.name=one", "defaults.distributed.engine=single",
          "defaults.distributed.nproc_per_node=1", "defaults.train.micro_batch_size=8"], tmp_path)
    _run(["run", str(path), "--quiet", "run.name=two", f"defaults.distributed.zero_stage={zero}"], tmp_path)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert _losses(two, "dpo") == pytest.approx(_losses(one, "dpo"), rel=1e-4)
    _assert_same_metrics(two, one, "dpo", {"rewards/chosen", "rewards/rejected", "rewards/margin",
                                           "rewards/accuracy", "logps/chosen", "grad_norm"})
    for key, value in _weights(one, "dpo").items():
        torch.testing.assert_close(_weights(two, "dpo")[key], value, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_grpo_on_two_ranks_computes_what_one_process_does(tmp_path: Path, zero: int):
    """Rollouts included: each completion has its own seeded generator, so the samples (and the
    step) are the same whichever rank draws them. ZeRO-3 with persistence threshold 0 really
    partitions the tiny model, which is what makes ranks' generation lengths matter."""
    recipe = _recipe(steps=3)
    single = {"engine": "single", "nproc_per_node": 1}
    for stage in ("pretrain", "sft"):  # the same starting policy in both runs, bit for bit
        recipe["stages"][stage]["distributed"] = single
        recipe["stages"][stage]["train"]["micro_batch_size"] = 8
    recipe["stages"]["grpo"] = {
        "kind": "grpo", "after": ["sft"], "data": {"generate": {"split": "prompts", "rows": 64}},
        "group_size": 4, "max_new_tokens": 6, "beta": 0.05, "epochs": 2, "temperature": 2.0,
        "rewards": [{"fn": "tests.grpo_rewards:ones"}, {"fn": "format", "weight": 0.5}],
        "train": {"steps": 4, "micro_batch_size": 2, "lr": 1e-2},
        "eval": {"exact_match": {"data": {"generate": {"task": "arithmetic", "split": "heldout", "rows": 8}},
                                 "formats": ["chat"]}},
    }
    if zero == 3:
        recipe["defaults"]["distributed"]["deepspeed_config"] = {
            "zero_optimization": {"stage3_param_persistence_threshold": 0}}
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet", "run.name=one", "stages.grpo.distributed.engine=single",
          "stages.grpo.distributed.nproc_per_node=1", "stages.grpo.train.micro_batch_size=4"], tmp_path)
    _run(["run", str(path), "--quiet", "run.name=two", f"defaults.distributed.zero_stage={zero}"], tmp_path)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    m1 = [json.loads(x) for x in (one / "grpo" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["completion_length"] for r in m2] == [r["completion_length"] for r in m1]
    assert [r["reward/mean"] for r in m2] == pytest.approx([r["reward/mean"] for r in m1])
    assert any(r["grad_norm"] > 0 for r in m1)
    assert _losses(two, "grpo") == pytest.approx(_losses(one, "grpo"), rel=1e-4, abs=1e-6)
    _assert_same_metrics(two, one, "grpo", {"reward/mean", "reward/std", "kl", "clip_fraction", "completion_length",
                                            "zero_std_groups", "grad_norm"})
    for key, value in _weights(one, "grpo").items():
        torch.testing.assert_close(_weights(two, "grpo")[key], value, atol=5e-5, rtol=1e-4)
    # Rollouts and rank 0's eval took the lean decoder (DeepSpeed's own module hooks once sent them
    # all through HF's forward, announced in the rank logs).
    assert (two / "grpo" / "eval.jsonl").read_text().strip()
    for log in sorted((two / "grpo" / "logs").glob("rank*.log")):
        assert "not the lean decoder" not in log.read_text(), log
