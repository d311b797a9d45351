"""Time the tiny pipeline: `make demo` from a fresh clone, a cold `instar run`, and a fully
cached `instar run`; record the accuracy table. Writes its section of bench/RESULTS.md.

    .venv/bin/python bench/pipeline.py            # cold + cached runs (about 3 minutes)
    .venv/bin/python bench/pipeline.py --make-demo  # also `make demo` in a fresh clone (+1-2 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from results import markers, write_section  # bench/results.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "pipeline.yaml"
START, END = markers("pipeline")


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def accuracy_rows(run_dir: Path) -> list[str]:
    graph = json.loads((run_dir / "graph.json").read_text())
    rows = []
    for stage in graph["stages"]:
        m = json.loads((run_dir / stage["name"] / "model" / "instar.json").read_text())["metrics"]
        pct = lambda k: f"{100 * m[k]:.1f} %" if k in m else "-"  # noqa: E731
        rows.append(f"| {stage['name']} | {stage['kind']} | {m.get('steps', 0)} | {pct('exact_match/plain')} | "
                    f"{pct('exact_match/chat')} | {m.get('train_seconds', m.get('merge_seconds', '-'))} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--make-demo", action="store_true", help="also time `make demo` in a fresh clone")
    parser.add_argument("--cached-repeats", type=int, default=3)
    args = parser.parse_args()
    instar = str(Path(sys.executable).parent / "instar")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        if args.make_demo:
            clone = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            make_demo = timed(["make", "demo"], clone)
            lines.append(f"- `make demo` in a fresh clone (creates .venv, installs, runs): **{make_demo:.0f} s**")
        cold = timed([instar, "run", str(RECIPE), f"run.output_dir={out}", "--quiet"], ROOT)
        cached = [timed([instar, "run", str(RECIPE), f"run.output_dir={out}", "--quiet"], ROOT)
                  for _ in range(args.cached_repeats)]
        lines.append(f"- `instar run recipes/tiny/pipeline.yaml`, cold (venv ready): **{cold:.0f} s**")
        lines.append(f"- the same, every stage cached: min {min(cached):.2f} / median "
                     f"{statistics.median(cached):.2f} / max {max(cached):.2f} s over {len(cached)} runs "
                     f"(target < 3 s)")
        table = accuracy_rows(out / "tiny-pipeline")
    import torch
    import transformers

    section = "\n".join([
        START,
        "## Tiny pipeline (`bench/pipeline.py`)",
        "",
        f"{date.today()}, {platform.machine()} CPU x{__import__('os').cpu_count()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        *lines,
        "",
        "Greedy exact match on the held-out problems (never trained on), as `a+b=` text and as a chat turn:",
        "",
        "| stage | kind | steps | acc a+b= | acc chat | seconds |",
        "|---|---|---|---|---|---|",
        *table,
        END,
    ])
    write_section("pipeline", section)
    print(section)


if __name__ == "__main__":
    main()
