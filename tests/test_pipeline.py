"""End to end on the tiny recipe: artifacts, caching, selective re-runs, status, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from instar.cli import main
from instar.config.load import load_recipe
from instar.graph.runner import run_recipe
from tests.conftest import tiny_recipe, write_recipe

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped", "data_share", "peak_mem_mb"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    path = write_recipe(folder, tiny_recipe())
    results = run_recipe(load_recipe(path), quiet=True)
    return path, load_recipe(path).run_dir, results


def test_every_stage_leaves_a_loadable_hf_artifact(finished_run):
    _, run_dir, results = finished_run
    assert [r.name for r in results] == ["pretrain", "cpt", "sft", "sft_steps", "merged"]
    for r in results:
        model_dir = run_dir / r.name / "model"
        assert (model_dir / "DONE").is_file() and (model_dir / "model.safetensors").is_file()
        meta = json.loads((model_dir / "instar.json").read_text())
        assert meta["stage"] == r.name and len(meta["fingerprint"]) == 16 and "config" in meta
        assert set(meta["metrics"]) >= {"exact_match/plain", "exact_match/chat"}
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        assert tok.chat_template and tok.eos_token == "<eos>"
        assert model.get_input_embeddings().num_embeddings == len(tok)
    assert (run_dir / "recipe.resolved.yaml").is_file()


def test_metrics_and_eval_logs(finished_run):
    _, run_dir, _ = finished_run
    lines = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all(METRIC_KEYS <= set(r) for r in lines)
    evals = [json.loads(x) for x in (run_dir / "sft" / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 6 and 0 <= evals[-1]["exact_match/chat"] <= 1


def test_merge_is_the_average_of_its_parents(finished_run):
    _, run_dir, _ = finished_run
    a = load_file(str(run_dir / "sft" / "model" / "model.safetensors"))
    b = load_file(str(run_dir / "sft_steps" / "model" / "model.safetensors"))
    m = load_file(str(run_dir / "merged" / "model" / "model.safetensors"))
    for key in m:
        torch.testing.assert_close(m[key], (a[key].double() + b[key].double()).div(2).float())


def test_rerun_skips_everything_and_lr_change_reruns_descendants(finished_run, capsys):
    path, run_dir, _ = finished_run
    stamp = {s: (run_dir / s / "model" / "DONE").stat().st_mtime_ns for s in ("pretrain", "cpt", "sft", "sft_steps")}
    again = run_recipe(load_recipe(path), quiet=True)
    assert all(r.cached for r in again)
    changed = run_recipe(load_recipe(path, ["stages.sft.train.lr=1e-4"]), quiet=True)
    assert {r.name for r in changed if not r.cached} == {"sft", "merged"}
    for stage in ("pretrain", "cpt", "sft_steps"):
        assert (run_dir / stage / "model" / "DONE").stat().st_mtime_ns == stamp[stage]
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("done") == 5


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "instar.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_mid_stage_resumes_to_identical_weights(tmp_path: Path, capsys):
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "cpt": recipe["stages"]["cpt"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 300, "checkpoint_every": 40}
    recipe["defaults"]["eval"] = {}
    path = write_recipe(tmp_path, recipe)

    reference = run_recipe(load_recipe(path, ["run.name=reference"]), quiet=True)
    assert not any(r.cached for r in reference)

    proc = _run_cli(["run", str(path), "run.name=killed"], tmp_path)
    ckpt = tmp_path / "runs" / "killed" / "pretrain" / "checkpoints" / "step-00000040"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stdout.read().decode()
    assert not (tmp_path / "runs" / "killed" / "pretrain" / "model").exists()
    assert main(["status", str(tmp_path / "runs" / "killed")]) == 0
    assert "failed" in capsys.readouterr().out

    resumed = _run_cli(["run", str(path), "run.name=killed"], tmp_path)
    out = resumed.communicate()[0].decode()
    assert resumed.returncode == 0, out
    assert "resuming from step-" in out
    for stage in ("pretrain", "cpt"):
        want = load_file(str(tmp_path / "runs" / "reference" / stage / "model" / "model.safetensors"))
        got = load_file(str(tmp_path / "runs" / "killed" / stage / "model" / "model.safetensors"))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (stage, key)
    ref_metrics = (tmp_path / "runs" / "reference" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    got_metrics = (tmp_path / "runs" / "killed" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    timing = {"tokens_per_s", "data_share", "peak_mem_mb"}
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]  # noqa: E731
    assert strip(ref_metrics) == strip(got_metrics)
