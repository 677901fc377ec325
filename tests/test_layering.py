"""Import directions the layout promises (issue 13, items 4-5).

* ``nn/`` knows no config and no training: no module under it imports ``config``, ``model``,
  ``training`` or ``errors.ConfigError`` (user-facing rules are checked once, at config load).
* the lever runner (``memory/runner.py``) runs the sweep of ``memory/force_checkpoint.py``, which
  imports nothing back (no cycle); ``nn/`` and ``parallel/`` import nothing from ``memory/``.
* Inference does not need the trainer: importing the ASE calculator or ``inference`` loads no
  ``scalable_equiformer.training`` module.
* No package module imports a higher layer (:data:`LAYERS`, issue 26), function-level imports
  included.
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
    assert "scalable_equiformer.nn.graph" in {m for m, _ in _imports(PACKAGE / "nn" / "equiformer.py")}
    assert "scalable_equiformer.nn.graph" in {m for m, _ in _imports(PACKAGE / "data" / "__init__.py")}


@pytest.mark.parametrize("module", ["scalable_equiformer.calculator", "scalable_equiformer.inference"])
def test_inference_imports_no_training_module(module):
    code = ("import json, sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('scalable_equiformer'))))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert module in loaded
    assert [m for m in loaded if m.startswith("scalable_equiformer.training")] == []


#: The package's layers, lowest first: a module may import its own layer and the layers below.
#: A name is a top-level module or subpackage of ``scalable_equiformer``; ``__init__`` (the
#: package's own ``__init__.py``, the public API) sits above everything.
LAYERS = [
    {"errors", "_lazy"},
    {"runtime", "devices", "config_text", "checkpoint_io", "presets"},
    {"nn"},
    {"memory"},
    {"config", "config_sections", "data"},
    {"model"},
    {"inference", "original"},
    {"parallel"},
    {"training", "calculator"},
    {"md", "profiling"},
    {"cli"},
    {"__init__"},
]

#: Imports up the layers that remain, each ``(importing module, imported module)``: to be removed,
#: not added to (issue 26 items 1-3 move the partition harness out of the package).
KNOWN_UPWARD: set = set()  # the last one (parallel/check.py -> profiling) went with the harness


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for level, names in enumerate(LAYERS):
        if name in names:
            return level
    raise AssertionError(f"{module}: not in LAYERS (add its layer to tests/test_layering.py)")


def _package_module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _upward(me: str, imports: list[tuple[str, list[str]]]) -> set[tuple[str, str]]:
    """``(me, target)`` for each of ``imports`` (:func:`_imports` output) above ``me``'s layer."""
    found = set()
    for module, names in imports:
        if module.startswith("scalable_equiformer"):
            targets = [module] if module != "scalable_equiformer" else [f"{module}.{n}" for n in names]
            found |= {(me, t) for t in targets if _layer(t) > _layer(me)}
    return found


def test_no_module_imports_a_higher_layer():
    found = set().union(*(_upward(_package_module(p), _imports(p)) for p in sorted(PACKAGE.rglob("*.py"))))
    assert found - KNOWN_UPWARD == set(), "imports up the layers (see LAYERS)"
    assert KNOWN_UPWARD - found == set(), "gone: remove them from KNOWN_UPWARD"


def test_the_layer_check_sees_an_upward_import():
    """The check is not vacuous: the building blocks reaching up into the data layer (as
    ``nn/equiformer.py`` once did for the radius graph) or ``from .. import model`` are found."""
    me = "scalable_equiformer.nn.equiformer"
    assert _upward(me, [("scalable_equiformer.data.graph", ["radius_graph"])]) == \
        {(me, "scalable_equiformer.data.graph")}
    assert _upward(me, [("scalable_equiformer", ["model", "errors"])]) == {(me, "scalable_equiformer.model")}
    assert _upward(me, [("scalable_equiformer.nn.graph", ["radius_graph"]), ("torch", [])]) == set()
    assert _package_module(PACKAGE / "data" / "__init__.py") == "scalable_equiformer.data"
    assert _package_module(PACKAGE / "__init__.py") == "scalable_equiformer"
