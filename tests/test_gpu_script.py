"""benchmarks/gpu/run.sh --device cpu: the GPU script's every phase, on the CPU with tiny sizes, so
that CI proves it does not rot (issue 14). Its output is checked field by field, not just its exit.

The wheel step is exercised with two hand-made wheels: one whose distribution is missing (it gets
installed into the script's site folder) and one named like an installed distribution (skipped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _wheel(folder: Path, dist: str, version: str = "0.1") -> Path:
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/__init__.py", "PROBE = 1\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{dist}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_script")
    wheels, out, site = tmp / "wheels", tmp / "out", tmp / "site"
    wheels.mkdir()
    _wheel(wheels, "se_probe_dist")
    _wheel(wheels, "pytest", "0.0")  # installed here: must be left alone
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(wheels), SE_WHEEL_SITE=str(site))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--device", "cpu", str(out)],
                          capture_output=True, text=True, timeout=840, env=env, cwd=tmp)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    return proc, out, site, summary


def test_runs_every_phase_within_its_budget(cpu_run):
    proc, out, site, s = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert s is not None
    assert list(s["phases"]) == ["env", "tests", "memory", "train", "compile", "tp", "report"]
    for name, p in s["phases"].items():
        assert p["status"] == "ok", (name, p.get("error"))
        assert 0 < p["seconds"] <= p["budget_s"] + 5, (name, p)
    assert s["device_arg"] == "cpu" and s["wall_s"] < s["budget_s"]
    assert "every phase ok" in proc.stdout
    # the device tool brings back at most 8 plain files with plain names
    files = sorted(x.name for x in out.iterdir())
    assert files == ["memory_cpu.md", "memory_profile.json", "pytest.xml", "run.log", "summary.json", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


def test_installs_only_the_missing_wheels(cpu_run):
    _, _, site, s = cpu_run
    inst = s["install"]
    assert inst["status"].startswith("ok: 1 installed") and inst["installed"] == ["se_probe_dist"]
    assert inst["already_there"] == ["pytest"]
    assert (site / "se_probe_dist" / "__init__.py").is_file() and not (site / "pytest").exists()


def test_env_and_equivalence_tests(cpu_run):
    _, out, _, s = cpu_run
    env = s["env"]
    assert env["cuda_available"] is False and env["torch"] and "NOT IMPORTABLE" not in env["deepspeed"] + env["ase"]
    tests = s["phases"]["tests"]
    assert tests["counts"].get("passed", 0) >= 8 and tests["failures"] == [] and "--device cpu" in tests["command"]
    assert "test_lever_equals_plain_on_device" in (out / "pytest.xml").read_text()


def test_memory_profile_of_every_lever_set(cpu_run):
    _, out, _, s = cpu_run
    mem = s["phases"]["memory"]
    assert (mem["measured"], mem["oom"], mem["not_measured"], mem["failed"]) == (12, 0, 0, 0)
    doc = json.loads((out / "memory_profile.json").read_text())
    assert doc["one_process"] and doc["device"].startswith("cpu") and doc["batch"] == 2
    assert sorted({r["atoms"] for r in doc["runs"]}) == [10, 20]
    sets = {r["lever_set"] for r in doc["runs"]}
    assert sets == {"none", "ckpt=forces", "ckpt=forces+chunk=auto", "bf16", "ckpt=forces+bf16", "ckpt=forces+keep=1"}
    for r in doc["runs"]:
        assert r["peak_bytes"] > 0 and r["step_seconds"] > 0 and r["estimated_peak_bytes"] > 0 and r["time_ratio"] > 0
    fit = mem["fit"]
    assert (fit["atoms"], fit["batch"]) == (20, 2) and len(fit["per_lever_set"]) == 6
    assert fit["device_memory_gib"] is None  # a CPU run: no device memory to fit in
    assert mem["plan"]["overrides"] and "no CUDA figures yet" in mem["plan"]["time_factors"]


def test_training_throughput_engines_and_estimates(cpu_run):
    _, _, _, s = cpu_run
    train = s["phases"]["train"]
    runs = {r["name"]: r for r in train["runs"]}
    assert list(runs) == ["md17_aspirin_fp32", "md17_aspirin_bf16", "md22_atat_zero2_fp32", "md22_atat_zero2_bf16",
                          "md22_atat_plain_fp32"]
    assert train["estimates"] == "ok" and "synthetic" in train["data_note"]
    for name, r in runs.items():
        assert r["status"] == "ok" and r["molecules_per_s"] > 0 and r["timed_steps"] == 2, (name, r)
        assert r["estimated_peak_bytes"] > 0 and r["peak_memory_bytes"] is None and r["device"] == "cpu"
        assert r["precision"] == ("bf16" if "bf16" in name else "fp32")
        assert r["engine"] == ("DeepSpeed ZeRO stage 2" if "zero2" in name else "plain torch"), r
        assert r["backend"] == "gloo"
    assert runs["md22_atat_zero2_fp32"]["atoms"] == 60 and runs["md17_aspirin_fp32"]["atoms"] == 21


def test_compiled_vs_eager_step(cpu_run):
    """The compile phase (train.compile vs eager): on the CPU the tiny model, Dynamo only (backend eager)."""
    _, out, _, s = cpu_run
    comp = s["phases"]["compile"]
    (run,) = comp["runs"]
    assert run["name"] == "tiny_b2_dynamo_only" and run["status"] == "ok" and run["backend"] == "eager"
    assert run["eager_s"] > 0 and run["compiled_s"] > 0 and run["compiled_over_eager"] > 0 and run["cold_compile_s"] > 0
    assert run["size_probe"] == [] and run["atoms"] == 42
    assert "## train.compile: compiled vs eager training step" in (out / "summary.md").read_text()


def test_tensor_products_phase(cpu_run):
    """The tp phase: e3nn, fast and cueq on the same steps (tiny model on the CPU, cueq's naive
    method), each case's seconds, the bf16 force error, the table in summary.md and the page."""
    _, out, _, s = cpu_run
    tp = s["phases"]["tp"]
    assert tp["implementations"] == ["e3nn", "fast", "cueq"] and tp["cueq_method"] == "naive"
    cases = [(c["system"], c["mode"], c["precision"]) for c in tp["runs"]]
    assert cases[:4] == [("aspirin_b2", "train", "fp32"), ("aspirin_b2", "infer", "fp32"),
                         ("aspirin_b2", "train", "bf16"), ("aspirin_b2", "infer", "bf16")]
    assert {c["system"] for c in tp["runs"]} == {"aspirin_b2", "atat_b1", "atat_b2"}
    first = tp["runs"][0]["results"]
    for impl in ("e3nn", "fast", "cueq"):
        assert first[impl]["status"] == "ok" and first[impl]["seconds"] > 0 and first[impl]["peak_bytes"] is None
    for c in tp["runs"]:  # within the budget every implementation ran; past it all were skipped
        assert {r["status"] for r in c["results"].values()} <= {"ok", "skipped"}, c
        if c["precision"] == "bf16" and c["results"]["cueq"]["status"] == "ok":
            assert c["results"]["cueq"]["correct"], c
    assert "## Depth-wise tensor products: e3nn, fast, cueq" in (out / "summary.md").read_text()
    assert "| aspirin_b2 | 21 | 2 | train | fp32 |" in (out / "memory_cpu.md").read_text()


def test_markdown_pages(cpu_run):
    _, out, _, s = cpu_run
    md = (out / "summary.md").read_text()
    for name in s["phases"]:
        assert f"| {name} | ok |" in md
    assert "## Training throughput through train.py" in md
    assert "| md22_atat_zero2_bf16 | DeepSpeed ZeRO stage 2 | bf16 |" in md
    page = (out / "memory_cpu.md").read_text()
    assert s["phases"]["report"]["page"] == "memory_cpu.md"
    assert "## Per lever set and molecule" in page and "| none (levers off) | 20 |" in page
    assert "## Time factors for the planner" in page and "| checkpoint.forces |" in page
    assert s["phases"]["report"]["cuda_time_factors"].startswith("none: a CPU run")
