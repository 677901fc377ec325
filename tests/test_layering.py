"""Import directions the layout promises (issue 13, items 4-5).

* ``nn/`` knows no config and no training: no module under it imports ``config``, ``model``,
  ``training`` or ``errors.ConfigError`` (user-facing rules are checked once, at config load).
* the lever runner (``memory/runner.py``) runs the sweep of ``memory/force_checkpoint.py``, which
  imports nothing back (no cycle); ``nn/`` and ``parallel/`` import nothing from ``memory/``.
* Inference does not need the trainer: importing the ASE calculator or ``inference`` loads no
  ``scalable_equiformer.training`` module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scalable_equiformer"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every import statement in ``path`` (nested too)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names]))
    return out


NN_MODULES = sorted((PACKAGE / "nn").glob("*.py"))


@pytest.mark.parametrize("path", NN_MODULES, ids=lambda p: p.name)
def test_nn_knows_no_config_and_no_training(path):
    for module, names in _imports(path):
        for banned in ("scalable_equiformer.config", "scalable_equiformer.model", "scalable_equiformer.training"):
            assert not (module == banned or module.startswith(banned + ".")), f"{path.name} imports {module}"
        if module == "scalable_equiformer.errors":
            assert "ConfigError" not in names, f"{path.name} imports ConfigError"
        if module == "scalable_equiformer":
            assert not {"config", "model", "training", "ConfigError"} & set(names), f"{path.name} imports {names}"
    assert "ConfigError" not in path.read_text(), f"{path.name} names ConfigError"


def test_force_checkpoint_does_not_import_the_runner():
    modules = {m for m, _ in _imports(PACKAGE / "memory" / "force_checkpoint.py")}
    assert "scalable_equiformer.memory.runner" not in modules
    assert "scalable_equiformer.memory.force_checkpoint" in {m for m, _ in _imports(PACKAGE / "memory" / "runner.py")}


@pytest.mark.parametrize("path", NN_MODULES + sorted((PACKAGE / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_blocks_and_partitions_import_no_lever(path):
    """config -> memory -> nn / parallel: the levers are passed down (a runner), never looked up."""
    for module, _ in _imports(path):
        assert not module.startswith("scalable_equiformer.memory"), f"{path.name} imports {module}"
        assert not module.startswith("scalable_equiformer.config"), f"{path.name} imports {module}"


def test_relative_imports_resolve_as_expected():
    """The checker above reads relative imports right (else it would pass vacuously)."""
    modules = {m for m, _ in _imports(PACKAGE / "model.py")}
    assert {"scalable_equiformer.config", "scalable_equiformer.nn.equiformer"} <= modules
    assert "scalable_equiformer.data.graph" in {m for m, _ in _imports(PACKAGE / "nn" / "equiformer.py")}


@pytest.mark.parametrize("module", ["scalable_equiformer.calculator", "scalable_equiformer.inference"])
def test_inference_imports_no_training_module(module):
    code = ("import json, sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('scalable_equiformer'))))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert module in loaded
    assert [m for m in loaded if m.startswith("scalable_equiformer.training")] == []
