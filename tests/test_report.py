"""`instar report RUN_DIR`: report.html from a real (small) run, and from bad input: a folder that
is no run, a metrics.jsonl cut off mid-line by a crash, a stage with no eval. The page is also
rendered in headless Chromium, which must decode every plot."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from instar.cli import main
from instar.report.collect import collect
from instar.report.html import render
from tests.conftest import tiny_recipe, write_recipe

CHROMIUM = "/usr/bin/chromium"
HEADINGS = ["Stage graph", "Final metrics", "Training curves", "Loss", "Learning rate", "Gradient norm",
            "Eval accuracy"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """pretrain -> cpt, pretrain -> sft (sft has no eval): three stages, about 10 s on 2 cores."""
    from instar.config.load import load_recipe
    from instar.graph.runner import run_recipe

    recipe = tiny_recipe()
    recipe["defaults"]["train"].update(log_every=1, checkpoint_every=1000)
    recipe["defaults"]["eval"]["exact_match"]["data"]["generate"]["rows"] = 8
    recipe["stages"] = {
        "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 200}},
                     "train": {"steps": 8}},
        "cpt": {"kind": "cpt", "after": ["pretrain"], "replay": 0.3,
                "data": {"generate": {"split": "cpt", "rows": 100}}, "train": {"steps": 4}},
        "sft": {"kind": "sft", "after": ["pretrain"], "data": {"generate": {"split": "sft", "rows": 100}},
                "train": {"steps": 4}, "eval": {"exact_match": None}},
    }
    loaded = load_recipe(write_recipe(tmp_path_factory.mktemp("report"), recipe))
    run_recipe(loaded, quiet=True)
    return loaded.run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run_dir.name
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors", "data"))
    return dest


def _report(run_dir: Path, capsys, *extra: str) -> str:
    assert main(["report", str(run_dir), *extra]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.is_file()
    return written.read_text()


class _Dom(HTMLParser):
    """Headings, <img> sources and stage nodes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.nodes: list[dict[str, str]] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "g" and "stage-node" in a.get("class", "").split():
            self.nodes.append(a)

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None


def _dom(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    return dom


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def _check_plots(dom: _Dom, expected: set[str]) -> None:
    assert {img.get("data-plot") for img in dom.imgs} == expected
    for img in dom.imgs:
        head, _, payload = img["src"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(payload)
        width, height = _png_size(png)
        assert width >= 600 and height >= 200 and len(png) > 5000, (img["data-plot"], width, height, len(png))


def test_report_of_a_real_run(run_dir: Path, capsys):
    page = _report(run_dir, capsys)
    assert (run_dir / "report.html").read_text() == page
    dom = _dom(page)
    assert dom.headings[0] == f"instar report: {run_dir.name}"
    for heading in HEADINGS:
        assert heading in dom.headings
    assert not any("DPO" in h or "GRPO" in h for h in dom.headings)  # no such metrics in this run
    _check_plots(dom, {"loss", "lr", "grad_norm", "eval"})
    assert [(n["data-stage"], n["data-state"]) for n in dom.nodes] == [
        ("pretrain", "done"), ("cpt", "done"), ("sft", "done")]
    assert page.count('class="stage-edge"') == 2
    for stage in collect(run_dir).stages:
        assert stage.fingerprint in page
    sft_row = re.search(r'<tr data-stage="sft">.*?</tr>', page).group(0)
    assert "no eval for this stage" in sft_row
    assert "Traceback" not in page


def test_metrics_cut_off_by_a_crash(run_dir: Path, tmp_path: Path, capsys):
    """cpt's process died mid-write: no artifact, state.json still says running, metrics.jsonl ends
    in half a line. The report renders what is there and says the stage was interrupted."""
    run = _copy(run_dir, tmp_path)
    stage = run / "cpt"
    (stage / "model" / "DONE").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = json.loads((stage / "state.json").read_text())
    state.update(state="running", pid=dead.pid, host=socket.gethostname(), time=time.time())
    (stage / "state.json").write_text(json.dumps(state))
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    (stage / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (stage / "eval.jsonl").unlink()

    cpt = collect(run).stage("cpt")
    assert cpt.state == "interrupted" and cpt.metrics_log.cut_off and cpt.last_step == len(lines) - 1
    page = _report(run, capsys, "--out", str(tmp_path / "r.html"))
    dom = _dom(page)
    assert [n["data-state"] for n in dom.nodes] == ["done", "interrupted", "done"]
    _check_plots(dom, {"loss", "lr", "grad_norm", "eval"})
    row = re.search(r'<tr data-stage="cpt">.*?</tr>', page).group(0)
    assert "interrupted" in row and f"after step {len(lines) - 1}" in row
    assert "metrics.jsonl: its last line was cut off by a crash; 1 line(s) skipped" in row


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "not an instar run directory"),
    (lambda d: (d / "graph.json").write_text('{"stages": [{"na'), "graph.json: not valid JSON"),
    (lambda d: (d / "graph.json").write_text('{"stages": 3}'), "graph.json: has no list of stages"),
    (lambda d: d.rmdir(), "no such directory"),
])
def test_not_a_run(tmp_path: Path, capsys, setup, needle):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    setup(folder)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (folder / "report.html").exists()


def test_unwritable_out(run_dir: Path, tmp_path: Path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "no" / "such" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report" in err and "Traceback" not in err


def test_dpo_and_grpo_curves_appear_when_logged(run_dir: Path, tmp_path: Path):
    run = _copy(run_dir, tmp_path)
    for name, extra in (("cpt", lambda i: {"rewards/margin": 0.1 * i, "rewards/accuracy": 0.5 + 0.1 * i}),
                        ("sft", lambda i: {"reward/mean": 0.2 * i, "kl": 0.01 * i})):
        path = run / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, **extra(i)}) + "\n" for i, r in enumerate(records)))
    dom = _dom(render(collect(run)))
    assert "DPO reward margin and accuracy" in dom.headings and "GRPO reward and KL" in dom.headings
    _check_plots(dom, {"loss", "lr", "grad_norm", "eval", "dpo", "grpo"})


# Reports the plots' decoded sizes into the DOM once the page has loaded.
PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
         "JSON.stringify([...document.images].map(i => [i.dataset.plot, i.complete, i.naturalWidth, "
         "i.naturalHeight]))));</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"{CHROMIUM} missing: install Debian's `chromium` (.ci/run does) to render the report")
def test_report_renders_in_chromium(run_dir: Path, tmp_path: Path, capsys):
    page = _report(run_dir, capsys, "--out", str(tmp_path / "report.html"))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    done = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _dom(done.stdout)
    for heading in HEADINGS:
        assert heading in dom.headings, dom.headings
    assert [n["data-stage"] for n in dom.nodes] == ["pretrain", "cpt", "sft"]
    _check_plots(dom, {"loss", "lr", "grad_norm", "eval"})
    loaded = json.loads(re.search(r'<body data-images="([^"]*)"', done.stdout).group(1).replace("&quot;", '"'))
    assert sorted(p for p, *_ in loaded) == ["eval", "grad_norm", "loss", "lr"]
    for plot, complete, width, height in loaded:
        assert complete and width >= 600 and height >= 200, (plot, complete, width, height)

    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", (tmp_path / "report.html").as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert _png_size(shot.read_bytes()) == (1280, 2400)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB
    if os.environ.get("INSTAR_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["INSTAR_REPORT_SCREENSHOT"])
