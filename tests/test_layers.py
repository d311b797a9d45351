"""The package's import layers (.importlinter, docs/architecture.md) hold: no module imports from a
layer above its own, directly or through others. And the recipe layer stays torch-free: loading
and validating every kind's definition imports neither torch nor the trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_import_layers_hold():
    pytest.importorskip("importlinter", reason="import-linter is a dev dependency")
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_kind_definitions_and_recipe_loading_import_no_torch():
    probe = ("import sys; import instar.kinds as k; [k.definition(n) for n in k.kind_names()]; "
             "import instar.config.load, instar.graph.dag; "
             "bad = [m for m in ('torch', 'instar.trainer', 'transformers') if m in sys.modules]; "
             "print(', '.join(bad), file=sys.stderr); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"imported: {done.stderr.strip()}"
