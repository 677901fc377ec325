"""The README's tutorial runs from a fresh copy of the repository with no ``../shared`` beside it
(issue 12): ``../shared`` exists only in this development setup, a user's clone has none.

The copy holds what a clone of the working tree holds (git's tracked and untracked, not ignored
files), in a temporary folder whose parent has no ``shared``. In it run, with the copy's package
first on the path: every line of the README block marked ``quick-tour``, the MD script of the
README's section 4 with 10 steps instead of 2000, and the ``--tiny`` example of
``tools/bench_model.py --help`` (its default data). A static check also finds no path into
``shared`` in the product's files (package, tools, train.py, configs, README).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["scalable_equiformer", "tools", "train.py", "configs", "README.md", "pyproject.toml", "Makefile"]


def _readme_blocks():
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- quick-tour:[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md: no block marked <!-- quick-tour: ... --> followed by a bash block"
    commands = [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    md = re.search(r"### 4\. Molecular dynamics.*?```python\n(.*?)```", text, re.S)
    assert md, "README.md: no python block in section 4"
    return commands, md.group(1)


def _product_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.splitlines()
        return [f for f in listed if (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but local state
        skip = {".git", ".venv", "runs", ".pytest_cache", "__pycache__"}
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)]


def test_no_product_file_points_into_shared():
    pattern = re.compile(r"""\.\./shared|["']shared["']\s*[/)]|/\s*["']shared["']|/work/shared""")
    hits = []
    for rel in _product_files():
        if not any(rel == p or rel.startswith(p + "/") for p in PRODUCT):
            continue
        path = REPO / rel
        if path.suffix in (".npz", ".png", ".pt"):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert hits == [], "\n".join(hits)


@pytest.mark.slow
def test_readme_quick_tour_from_a_copy_without_shared(tmp_path):
    commands, md_script = _readme_blocks()
    assert len(commands) >= 4 and all(c.startswith("python ") for c in commands), commands
    steps = "dyn.run(2000)"
    assert steps in md_script, "README section 4: the MD script should end with dyn.run(2000) (CI runs 10 steps)"

    clone = tmp_path / "clone" / "scalable_equiformer"
    for rel in _product_files():
        dst = clone / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    assert not (clone.parent / "shared").exists() and not (clone / "runs").exists()

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")

    def run(argv, timeout=600):
        proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, \
            f"{' '.join(argv)} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    where = run([sys.executable, "-c", "import scalable_equiformer; print(scalable_equiformer.__file__)"]).stdout
    assert Path(where.strip()).resolve().is_relative_to(clone.resolve()), where  # the copy's package, not this one

    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "python"
        run([sys.executable] + argv[1:])

    assert (clone / "runs" / "demo_quick" / "results.json").is_file()
    assert list((clone / "runs").glob("demo_quick/best.*.test.json"))  # evaluate.py's metrics
    quick = clone / "runs" / "quick" / "md17_l2"
    assert (quick / "aspirin_l2" / "best.pt").is_file() and (quick / "table.md").is_file()

    script = clone / "md_quick.py"
    script.write_text(md_script.replace(steps, "dyn.run(10)"))
    out = run([sys.executable, str(script)]).stdout
    assert "fs  E_tot" in out and (clone / "runs" / "md.traj").is_file()

    run([sys.executable, "tools/bench_model.py", "--tiny", "--repeats", "1", "--modes", "forces"])

    # what the tour writes goes under the git-ignored runs/: md.traj once landed in the root
    copied = {rel.split("/")[0] for rel in _product_files()}
    made = sorted(p.name for p in clone.iterdir() if p.name not in copied | {"runs", "md_quick.py"})
    assert made == [], made
