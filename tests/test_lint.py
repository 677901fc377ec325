"""The linter (ruff, the rules in pyproject.toml's [tool.ruff]) passes on the whole repository, and
the ``>>>`` examples of the modules users read first run as written (doctests)."""

from __future__ import annotations

import doctest
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in the dev extra (pip install -e '.[dev]')")
    return [exe]


def test_ruff_passes():
    out = subprocess.run(_ruff() + ["check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_would_catch_an_unused_import(tmp_path):
    """The check above is not vacuous: the same configuration flags a file with an unused import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    out = subprocess.run(_ruff() + ["check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "F401" in out.stdout, out.stdout


@pytest.mark.parametrize("module", ["scalable_equiformer.config", "scalable_equiformer.cli"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no >>> examples"
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed"
