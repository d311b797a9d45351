"""`instar report` on a real run with dpo and grpo stages: their curves come from what the kinds
actually log (not fields written into metrics.jsonl by hand), and Chromium renders every plot."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from instar.report.collect import collect
from instar.report.html import render
from tests.conftest import tiny_recipe, write_recipe
from tests.test_report import CHROMIUM, _check_plots, _chromium, _dom, _png_size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """pretrain -> sft -> dpo -> grpo (beta > 0, so KL is logged); a few steps each."""
    from instar.config.load import load_recipe
    from instar.graph.runner import run_recipe

    recipe = tiny_recipe()
    recipe["defaults"]["train"].update(log_every=1, checkpoint_every=1000)
    recipe["defaults"]["eval"]["exact_match"]["data"]["generate"]["rows"] = 8
    recipe["stages"] = {
        "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 200}},
                     "train": {"steps": 6}},
        "sft": {"kind": "sft", "after": ["pretrain"], "data": {"generate": {"split": "sft", "rows": 100}},
                "train": {"steps": 4}},
        "dpo": {"kind": "dpo", "after": ["sft"], "beta": 0.1, "data": {"generate": {"split": "dpo", "rows": 32}},
                "train": {"steps": 5}, "eval": {"exact_match": None}},
        "grpo": {"kind": "grpo", "after": ["dpo"], "beta": 0.05, "group_size": 4, "max_new_tokens": 4,
                 "data": {"generate": {"split": "prompts", "rows": 32}},
                 "rewards": [{"fn": "tests.grpo_rewards:ones"}],
                 "train": {"steps": 5, "micro_batch_size": 2, "lr": 1e-2}},
    }
    loaded = load_recipe(write_recipe(tmp_path_factory.mktemp("report-post"), recipe))
    run_recipe(loaded, quiet=True)
    return loaded.run_dir


def test_dpo_and_grpo_sections_come_from_the_kinds_logs(run_dir: Path):
    run = collect(run_dir)
    dpo_keys = set(run.stage("dpo").steps[-1])
    grpo_keys = set(run.stage("grpo").steps[-1])
    assert {"rewards/margin", "rewards/accuracy"} <= dpo_keys
    assert {"reward/mean", "kl"} <= grpo_keys
    dom = _dom(render(run))
    assert "DPO reward margin and accuracy" in dom.headings and "GRPO reward and KL" in dom.headings
    _check_plots(dom, {"loss", "lr", "grad_norm", "eval", "dpo", "grpo"})
    alts = {img["data-plot"]: img["alt"] for img in dom.imgs}
    assert "DPO" in alts["dpo"] and "GRPO" in alts["grpo"]
    # the dpo stage has no eval: said so, never an error
    assert "no eval for this stage" in " ".join(run.stage("dpo").notes())


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"{CHROMIUM} missing: install Debian's `chromium` (.ci/run does) to render the report")
def test_post_training_report_renders_in_chromium(run_dir: Path, tmp_path: Path):
    from instar.report import write_report

    page = write_report(run_dir, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
                   "JSON.stringify([...document.images].map(i => [i.dataset.plot, i.complete, i.naturalWidth]))))"
                   ";</script></body>"))
    done = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(re.search(r'<body data-images="([^"]*)"', done.stdout).group(1).replace("&quot;", '"'))
    assert sorted(p for p, *_ in loaded) == ["dpo", "eval", "grad_norm", "grpo", "loss", "lr"]
    assert all(complete and width >= 600 for _, complete, width in loaded), loaded
    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4200", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert _png_size(shot.read_bytes()) == (1280, 4200)
    if os.environ.get("INSTAR_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["INSTAR_REPORT_SCREENSHOT"])
