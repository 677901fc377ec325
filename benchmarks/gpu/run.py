#!/usr/bin/env python
"""The phases of ``benchmarks/gpu/run.sh`` (start it through run.sh, which installs the wheels).

    python benchmarks/gpu/run.py --device cuda --budget 450 --out OUT [--work DIR] [--keep-work]

Phases, each a subprocess with its own time limit (a share of what is left of ``--budget``, so
time a phase does not use goes to the later ones), each recorded in ``OUT/summary.json`` whatever
happens to the others:

``env``     python, torch, CUDA, GPU, NCCL and package versions; deepspeed and ase importable?
``tests``   ``pytest tests/test_device_equivalence.py -m gpu_equivalence --device DEV``: levers vs
            plain path, partitions vs one process, calculator on the device vs the CPU
``memory``  ``tools/memory_profile.py --device DEV --one-process``: the seven MD22 sizes (42, 56,
            60, 87, 118, 148, 370 atoms: synthetic molecules packed from AT-AT copies,
            ``profiling/systems.py``) at the paper's batch of 8, lever sets none,
            ``checkpointing=forces``, forces + edge chunks, bf16, forces + bf16, ``keep_blocks=3``:
            ``max_memory_allocated``, step time, time ratios, the estimate; and the plan for the
            370-atom molecule on this GPU's memory
``train``   ``train.py`` for a fixed number of steps (``train.max_steps``, one epoch): md17_aspirin
            (batch 8) on the shipped GFN2-xTB aspirin frames, fp32 and bf16; md22_atat (its
            config: DeepSpeed ZeRO-2, NCCL on one GPU; two micro-batches of 4) on synthetic AT-AT
            frames (shipped frame 0 + random displacements, harmonic energies and forces), fp32
            and bf16, and with plain torch (ZeRO off) for comparison; molecules/s over the steps
            after the first few, the run's CUDA peak (results.json) against the planner's estimate
``compile`` ``tools/bench_model.py --compile compare``: the training step of ``train.compile: true``
            (traced energy-and-forces, torch.compile'd) against the eager step, alternated, batch 8
            of the shipped aspirin frames: the tiny model, then the paper's model with what time is
            left (its cold compile may not fit: then that run is recorded as a timeout, the phase
            stays ok); cold compile seconds, medians, compiled/eager, and whether other batch sizes
            recompile. ``--device cpu``: the tiny model only, batch 2, with torch.compile's
            ``eager`` backend (Dynamo only, the traced graph run as it is: inductor's cold compile
            takes minutes on two cores), so CI checks the phase and the tracing, not the speed
``tp``      ``benchmarks/gpu/tp_bench.py``: the depth-wise tensor products e3nn, fast and cueq
            (``model.tensor_product``) on the same steps of the paper's model: aspirin batch 8,
            AT-AT batch 1 and 4, training and inference step, fp32 and bf16 (with the bf16 force
            error against fp32 fast); median seconds, CUDA peak, the method cueq ran (uniform_1d =
            its CUDA kernel); results in summary.json, the table in summary.md and the memory page.
            ``--device cpu``: the tiny model, aspirin batch 2, AT-AT batch 1 and 2
``report``  ``tools/memory_tables.py``: OUT/memory_cuda.md (the page for benchmarks/memory_cuda.md)
            and, on CUDA, OUT/time_factors_cuda.json (the planner's CUDA time factors); the ``tp``
            phase's table is appended to the page

``--device cpu``: the same phases with a tiny model, tiny molecules and 3 steps (about 3-4
minutes on two busy cores), so that CI proves the script works (tests/test_gpu_script.py).
OUT gets at most 7 files (the device tool brings back 8): summary.json, summary.md, run.log (every
subprocess's output), pytest.xml, memory_profile.json, memory_cuda.md (memory_cpu.md with
--device cpu), time_factors_cuda.json. Exit status 0 when every phase is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30

#: the MD22 sizes (atoms); the 370-atom nanotube first: a time budget then cuts small ones first
MD22_SIZES = [370, 42, 56, 60, 87, 118, 148]
LEVER_SETS = ["none", "checkpointing=forces", "checkpointing=forces,edge_chunk_size=auto", "precision=bf16",
              "checkpointing=forces,precision=bf16", "keep_blocks=3"]
#: shares of the time budget (what a phase does not use goes to the later ones)
SHARES = {"tests": 70, "memory": 190, "train": 170, "compile": 110, "tp": 70}
PHASES = ["env", "tests", "memory", "train", "compile", "tp", "report"]

#: the tiny model of --device cpu (tools/partition_harness.py's tiny_model)
TINY = {"irreps_node": "8x0e+4x1e+2x2e", "num_blocks": 2, "num_heads": 2, "irreps_head": "4x0e+2x1e+1x2e",
        "irreps_feedforward": "16x0e+8x1e+4x2e", "irreps_feature": "16x0e", "num_radial": 8, "radial_hidden": "[16]"}


class Runner:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="se_gpu_run_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "run.log"
        self.log_path.write_text("")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.python = args.python or sys.executable
        self.summary = {"device_arg": args.device, "budget_s": args.budget,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "python": self.python, "root": str(ROOT), "work": str(self.work), "phases": {},
                        "install": _install_info()}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = str(ROOT) + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("DS_ACCELERATOR", args.device)  # DeepSpeed's, as the trainer sets it
        if not self.cuda:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.reserve = 25.0 if self.cuda else 15.0  # seconds kept for the report phase

    # -- bookkeeping --
    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {text}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_for(self, phase: str) -> float:
        """This phase's share of what is left (minus the report's reserve)."""
        later = [p for p in SHARES if PHASES.index(p) >= PHASES.index(phase)]
        left = self.left() - self.reserve
        return max(left * SHARES[phase] / sum(SHARES[p] for p in later), 0.0)

    def write_summary(self) -> None:
        self.summary["wall_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")

    def call(self, cmd: list, timeout: float, cwd=ROOT, env=None, stdout_file=None) -> dict:
        """Run ``cmd`` (its output appended to run.log, or its stdout to ``stdout_file``), killing
        its process group at ``timeout``."""
        timeout = max(timeout, 1.0)
        with self.log_path.open("a") as log:
            log.write(f"\n===== {' '.join(map(str, cmd))}  (time limit {timeout:.0f} s)\n")
            log.flush()
            start = log.tell()
            t = time.monotonic()
            sink = open(stdout_file, "w") if stdout_file else log
            proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or self.env, stdout=sink,
                                    stderr=log if stdout_file else subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
            seconds = time.monotonic() - t
            if stdout_file:
                sink.close()
            log.write(f"===== exit {rc}{' (killed at the time limit)' if timed_out else ''} after {seconds:.1f} s\n")
        with self.log_path.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        return {"rc": rc, "timed_out": timed_out, "seconds": round(seconds, 1), "output": text}

    def phase(self, name: str, fn) -> None:
        timeout = self.timeout_for(name) if name in SHARES else min(60.0, max(self.left() - self.reserve, 5.0))
        if name == "report":
            timeout = max(self.left() - 2.0, 5.0)
        record = {"status": "skipped", "budget_s": round(timeout, 1)}
        self.summary["phases"][name] = record
        if timeout < 5.0:
            record["error"] = "no time left in the budget"
            self.say(f"{name}: skipped, no time left")
            self.write_summary()
            return
        self.say(f"{name}: start (time limit {timeout:.0f} s)")
        t = time.monotonic()
        try:
            record.update(fn(timeout) or {})
            record.setdefault("status", "ok")
            if record["status"] == "skipped":
                record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - a failing phase never stops the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        record["seconds"] = round(time.monotonic() - t, 1)
        self.say(f"{name}: {record['status']} in {record['seconds']:.0f} s"
                 + (f" ({record['error'][:300]})" if record.get("error") else ""))
        self.write_summary()


def _kill_group(proc) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _install_info() -> dict:
    return {"status": os.environ.get("SE_WHEELS_STATUS", "not run through run.sh"),
            "installed": os.environ.get("SE_WHEELS_INSTALLED", "").split(),
            "already_there": os.environ.get("SE_WHEELS_PRESENT", "").split(),
            "seconds": float(os.environ.get("SE_WHEELS_SECONDS", "0") or 0)}


def _tail(text: str, n: int = 12) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and not x.startswith("=====")]
    return "\n".join(lines[-n:])


def _status(res: dict, ok: bool = True) -> dict:
    """ok / timeout / failed, with the last line of the output in ``error`` (its first line is
    what the tables show) and the last lines in ``output_tail``."""
    tail = _tail(res["output"])
    last = tail.splitlines()[-1] if tail else "(no output)"
    if res["timed_out"]:
        return {"status": "timeout", "error": f"killed at its time limit; last output: {last}", "output_tail": tail}
    if res["rc"] != 0 or not ok:
        return {"status": "failed", "error": f"exit {res['rc']}: {last}", "output_tail": tail}
    return {"status": "ok"}


# ---- phases ------------------------------------------------------------------------------------

ENV_PROBE = r"""
import importlib, json, platform, subprocess, sys
out = {"python": sys.version.split()[0], "platform": platform.platform()}
import torch
out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_total_memory_bytes=int(p.total_memory),
               capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:
        out["nccl"] = f"unavailable: {e}"
out["distributed"] = {b: getattr(torch.distributed, f"is_{b}_available")() for b in ("nccl", "gloo")}
for name in ("e3nn", "torch_geometric", "numpy", "scipy", "deepspeed", "ase", "pydantic", "pytest", "yaml",
             "cuequivariance_torch", "cuequivariance_ops_torch"):
    try:
        m = importlib.import_module(name)
        out[name] = getattr(m, "__version__", "?") + " " + str(getattr(m, "__file__", ""))
    except Exception as e:
        out[name] = f"NOT IMPORTABLE: {type(e).__name__}: {e}"
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:
    out["nvidia_smi"] = f"unavailable: {e}"
print("ENV_JSON " + json.dumps(out))
"""


def phase_env(r: Runner, timeout: float) -> dict:
    res = r.call([r.python, "-c", ENV_PROBE], timeout)
    line = next((x for x in res["output"].splitlines() if x.startswith("ENV_JSON ")), None)
    info = json.loads(line[len("ENV_JSON "):]) if line else {}
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=10).stdout.strip() or "unknown (no .git)"
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = "unknown"
    r.summary["env"] = info
    out = _status(res, ok=line is not None)
    if out["status"] == "ok" and r.cuda and not info.get("cuda_available"):
        out = {"status": "failed", "error": "--device cuda, but torch sees no CUDA device"}
    missing = [k for k in ("deepspeed", "ase") if str(info.get(k, "")).startswith("NOT IMPORTABLE")]
    if missing and out["status"] == "ok":
        out = {"status": "failed", "error": f"not importable: {', '.join(missing)} (benchmarks/gpu/prepare_wheels.sh, "
                                            f".whl/ carried with the checkout?)"}
    return out


def phase_tests(r: Runner, timeout: float) -> dict:
    xml = r.out / "pytest.xml"
    marker = "gpu_equivalence" if r.cuda else "gpu_equivalence and not slow"  # CPU: the suite runs the slow one
    cmd = [r.python, "-m", "pytest", "tests/test_device_equivalence.py", "-m", marker, "--device",
           r.args.device, "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    res = r.call(cmd, timeout)
    out = {"command": "python " + " ".join(f"'{c}'" if " " in str(c) else str(c)
                                           for c in cmd[1:]).replace(str(xml), "OUT/pytest.xml")}
    counts, failures = {}, []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = suite.findall("testcase") if suite is not None else []
        for c in cases:
            kind = next((k for k in ("failure", "error", "skipped") if c.find(k) is not None), "passed")
            counts[kind] = counts.get(kind, 0) + 1
            if kind in ("failure", "error"):
                el = c.find(kind)
                failures.append({"name": f"{c.get('classname', '')}::{c.get('name')}",
                                 "message": (el.get("message") or el.text or "")[:1000]})
    out.update(counts=counts, failures=failures)
    ok = bool(counts.get("passed")) and not failures
    out.update(_status(res, ok))
    if res["rc"] == 0 and not ok:
        out["error"] = "no test passed"
    return out


def phase_memory(r: Runner, timeout: float) -> dict:
    doc_path = r.out / "memory_profile.json"
    common = ["--device", r.args.device, "--one-process", "--time-budget", f"{max(timeout - 20, 10):.0f}",
              "--json", doc_path, "--plan", "--allow-bf16"]
    if r.cuda:
        gpu = r.summary.get("env", {}).get("gpu_total_memory_bytes")
        cmd = [r.python, "tools/memory_profile.py", "--set", "data.name=synthetic", "--sweep", "atoms",
               "--sweep-atoms", ",".join(map(str, MD22_SIZES)), "--batch-size", "8", "--timing-steps", "1",
               "--gpu-memory", f"{gpu / GiB:.2f}GB" if gpu else "139GB"]
        levers = LEVER_SETS
    else:
        cfg = r.work / "tiny.yaml"
        cfg.write_text("data:\n  name: synthetic\nmodel:\n" + "".join(f"  {k}: {v}\n" for k, v in TINY.items())
                       + "train:\n  batch_size: 2\n")
        cmd = [r.python, "tools/memory_profile.py", "--config", cfg, "--sweep", "atoms", "--sweep-atoms", "20,10",
               "--batch-size", "2", "--timing-steps", "1", "--gpu-memory", "1GB"]
        levers = [x.replace("keep_blocks=3", "keep_blocks=1") for x in LEVER_SETS]
    for spec in levers:
        cmd += ["--levers", spec]
    res = r.call(cmd + common, timeout)
    out = {"command": " ".join(map(str, cmd[1:] + common)).replace(str(doc_path), "OUT/memory_profile.json")}
    if not doc_path.is_file():
        out.update(_status(res, ok=False))
        return out
    doc = json.loads(doc_path.read_text())
    runs = doc["runs"]
    kinds = {"measured": 0, "oom": 0, "not_measured": 0, "failed": 0}
    for x in runs:
        kinds["oom" if x.get("oom") else "not_measured" if x.get("not_measured") else "failed" if x.get("error")
              else "measured"] += 1
    out.update(kinds, runs=len(runs), device=doc.get("device"), fit=_fit(doc))
    if doc.get("plan"):
        out["plan"] = {"budget_gib": round(doc["plan"]["budget_bytes"] / GiB, 2), "overrides": doc["plan"]["overrides"],
                       "best": doc["plan"]["best"], "time_factors": doc["plan"].get("time_factors", {}).get("source")}
    out.update(_status(res, ok=kinds["measured"] > 0 and kinds["failed"] == 0))
    return out


def _fit(doc: dict) -> dict:
    """Does the largest molecule's step fit in the device's memory, without and with levers?"""
    runs = doc["runs"]
    top = max(runs, key=lambda x: (x["atoms"] * x["batch"], x["edges"]))
    mine = [x for x in runs if (x["atoms"], x["batch"]) == (top["atoms"], top["batch"])]
    total = next((x.get("device_total_memory_bytes") for x in runs if x.get("device_total_memory_bytes")), None)
    per = {}
    for x in mine:
        label = x.get("lever_set") or "?"
        if x.get("oom"):
            per[label] = {"fits": False, "peak_gib": None, "oom": True}
        elif "peak_bytes" in x:
            per[label] = {"fits": (x["peak_bytes"] <= total) if total else None,
                          "peak_gib": round(x["peak_bytes"] / GiB, 3)}
        else:
            per[label] = {"fits": None, "peak_gib": None, "why": x.get("error")}
        per[label]["estimate_gib"] = round(x["estimated_peak_bytes"] / GiB, 3)
    return {"atoms": top["atoms"], "batch": top["batch"], "edges": top["edges"],
            "device_memory_gib": round(total / GiB, 2) if total else None,
            "without_levers": per.get("none", {}).get("fits"),
            "with_levers_that_fit": [k for k, v in per.items() if k != "none" and v.get("fits")],
            "per_lever_set": per}


def make_atat(path: str, frames: int, seed: int = 0) -> int:
    """AT-AT frames for the throughput runs: the shipped frame 0 (profiling/systems.py's 60-atom
    molecule) with random displacements (0.05 Å), harmonic energies and forces (k = 20 eV/Å^2), in
    eV and Å. Labels exercise the loss; the throughput does not depend on them."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from scalable_equiformer.profiling import systems

    frames = int(frames)
    z, pos = systems.synthetic_molecule(60)
    rng = np.random.default_rng(seed)
    d = rng.normal(scale=0.05, size=(frames, len(z), 3))
    k = 20.0
    np.savez(path, z=z.astype(np.int64), R=pos[None] + d, E=(0.5 * k * (d ** 2).sum((1, 2)))[:, None],
             F=-k * d, e_unit=np.array("eV"), r_unit=np.array("Ang"),
             name=np.array("AT-AT synthetic (harmonic around shipped xTB frame 0)"))
    return 0


def _train_runs(r: Runner) -> list:
    pkg = ROOT / "scalable_equiformer" / "demo_data"
    if r.cuda:  # (steps, warm-up steps not timed): AT-AT steps take ~3x aspirin's
        batch, small, large = 8, (30, 5), (20, 4)
        extra = []
    else:
        batch, small, large = 2, (3, 1), (3, 1)
        extra = [f"model.{k}={v}" for k, v in TINY.items()] + [f"train.batch_size={batch}"]
    atat = r.work / "atat_synthetic.npz"
    aspirin = [f"data.path={pkg / 'aspirin_xtb_500K.npz'}"]
    atat_data = [f"data.path={atat}"] + ([] if r.cuda else ["memory.micro_batch_size=1"])
    runs = [("md17_aspirin_fp32", "md17_aspirin", aspirin, small),
            ("md17_aspirin_bf16", "md17_aspirin", aspirin + ["memory.precision=bf16"], small),
            ("md22_atat_zero2_fp32", "md22_atat", atat_data, large),
            ("md22_atat_zero2_bf16", "md22_atat", atat_data + ["memory.precision=bf16"], large),
            ("md22_atat_plain_fp32", "md22_atat", atat_data + ["deepspeed.zero_stage=0", "deepspeed.enabled=false"],
             large)]
    out = []
    for name, config, over, (steps, warm) in runs:
        # one epoch (train_size = steps x batch): no evaluation or checkpoint between the timed steps
        common = [f"data.train_size={steps * batch}", f"data.val_size={batch}", f"data.test_size={batch}",
                  f"train.max_steps={steps}", "train.log_every=1", f"train.eval_batch_size={batch}",
                  f"train.device={r.args.device}", "train.progress=false", "logging.tensorboard=false",
                  "logging.plot=false", f"train.out_dir={r.work / 'runs'}"] + extra
        out.append({"name": name, "config": config, "overrides": common + over + [f"train.run_name={name}"],
                    "batch": batch, "steps": steps, "warm": warm,
                    "data": next(x.split("=", 1)[1] for x in over if x.startswith("data.path="))})
    return out


def phase_train(r: Runner, timeout: float) -> dict:
    t_end = time.monotonic() + timeout
    runs = _train_runs(r)
    out = {"data_note": ("md17_aspirin: the shipped GFN2-xTB aspirin frames (scalable_equiformer/demo_data, not MD17); "
                         "md22_atat: synthetic frames (shipped AT-AT xTB frame 0 + 0.05 Å random displacements, "
                         "harmonic energies/forces); configs as shipped, one epoch of train.max_steps steps; "
                         "molecules/s over the steps after the first warm ones"),
           "runs": []}
    # one subprocess: the AT-AT frames, then the planner's estimate of each run (the memory phase's
    # census of the model when it has one, else its own)
    spec = r.work / "prepare_spec.json"
    est_out = r.work / "estimates.json"
    atat_frames = max(x["steps"] for x in runs) * runs[0]["batch"] + 2 * runs[0]["batch"]
    spec.write_text(json.dumps({"runs": runs, "profiles": str(r.out / "memory_profile.json"), "device": r.args.device,
                                "atat": str(r.work / "atat_synthetic.npz"), "atat_frames": atat_frames}))
    res = r.call([r.python, str(Path(__file__).resolve()), "--prepare-train", spec, est_out],
                 min(90.0 if r.cuda else 120.0, 0.3 * timeout))
    estimates = json.loads(est_out.read_text()) if est_out.is_file() else {}
    out["estimates"] = estimates.pop("_error", "ok") if estimates else _status(res, ok=False).get("error", "failed")
    for i, run in enumerate(runs):
        left = t_end - time.monotonic()
        share = left / (len(runs) - i)
        rec = {"name": run["name"], "config": run["config"], "batch": run["batch"], "steps": run["steps"],
               "precision": "bf16" if "memory.precision=bf16" in run["overrides"] else "fp32"}
        rec.update({k: v for k, v in estimates.get(run["name"], {}).items()})
        out["runs"].append(rec)
        if share < 5:
            rec.update(status="skipped", error="no time left")
            continue
        cmd = [r.python, "train.py", "--config", run["config"], "--set", *run["overrides"]]
        res = r.call(cmd, share)
        rec["seconds"] = res["seconds"]
        rec.update(_read_run(r.work / "runs" / run["name"], run, res["output"]))
        rec.update(_status(res, ok=rec.get("molecules_per_s") is not None))
        r.say(f"  {run['name']}: {rec['status']}, "
              + (f"{rec['molecules_per_s']:.1f} molecules/s" if rec.get("molecules_per_s") else "no throughput"))
    bad = [x["name"] for x in out["runs"] if x.get("status") != "ok"]
    if bad:
        out.update(status="failed", error="runs not ok: " + ", ".join(bad))
    return out


def _read_run(folder: Path, run: dict, output: str) -> dict:
    rec = {}
    m = re.search(r"\((DeepSpeed ZeRO stage \d|plain torch), (\w+) backend", output)
    if m:
        rec["engine"], rec["backend"] = m.group(1), m.group(2)
    m = re.search(r"= \d+ rank\(s\) x (\d+) micro-batch\(es\) x (\d+)", output)
    if m:
        rec["micro_batches"], rec["micro_batch_size"] = int(m.group(1)), int(m.group(2))
    res_file = folder / "results.json"
    if res_file.is_file():
        res = json.loads(res_file.read_text())
        rec["peak_memory_bytes"] = res.get("peak_memory_bytes")
        rec["device"] = res.get("device")
        rec["steps_done"] = res.get("steps")
    rows = []
    metrics = folder / "metrics.csv"
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = [x for x in csv.DictReader(f) if x.get("train_loss") and not x.get("val_force_mae_meV_per_A")
                    and x.get("epoch") == "1" and x.get("kind", "step") == "step"]  # not the epoch row (same step)
    pts = sorted((int(x["step"]), float(x["time"])) for x in rows)  # time = end of the step, from the start
    k = min(max(run["warm"] - 1, 0), max(len(pts) - 2, 0))  # timed: the steps after the first `warm`
    if len(pts) >= 2 and pts[-1][1] > pts[k][1]:
        rec["timed_steps"] = pts[-1][0] - pts[k][0]
        rec["molecules_per_s"] = run["batch"] * rec["timed_steps"] / (pts[-1][1] - pts[k][1])
        rec["seconds_per_step"] = (pts[-1][1] - pts[k][1]) / rec["timed_steps"]
        rec["first_step_seconds"] = pts[0][1]
    if rec.get("peak_memory_bytes") and rec.get("estimated_peak_bytes"):
        rec["measured_over_estimated"] = rec["peak_memory_bytes"] / rec["estimated_peak_bytes"]
    return rec


def prepare_train(spec_path: str, out_path: str) -> int:
    """The synthetic AT-AT frames, then the planner's estimate for each training run (the
    config's levers, its molecule and batch) into ``out_path``; an estimate that fails is
    recorded there (``_error``), the frames are written before."""
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    make_atat(spec["atat"], spec["atat_frames"])
    try:
        return estimate_training(spec, out_path)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        Path(out_path).write_text(json.dumps({"_error": f"{type(exc).__name__}: {exc}"}))
        return 1


def estimate_training(spec: dict, out_path: str) -> int:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from scalable_equiformer.config import load_config
    from scalable_equiformer.model import build_model
    from scalable_equiformer.profiling import estimate as est
    from scalable_equiformer.profiling import systems

    prof_doc = {}
    if spec.get("profiles") and Path(spec["profiles"]).is_file():
        prof_doc = json.loads(Path(spec["profiles"]).read_text())
    profiles, out = {}, {}
    for run in spec["runs"]:
        cfg = load_config(run["config"], run["overrides"])
        mcfg = copy.deepcopy(cfg)
        mcfg.model.avg_num_neighbors = mcfg.model.avg_num_neighbors or 25.0
        mcfg.model.avg_num_atoms = mcfg.model.avg_num_atoms or 20.0
        precision = cfg.memory.precision
        key = (json.dumps(_model_key(cfg.to_dict()["model"]), sort_keys=True), precision)
        if key not in profiles:
            saved = prof_doc.get("activation_profiles", {}).get(precision)
            if saved and _model_key(prof_doc.get("model") or {}) == _model_key(cfg.to_dict()["model"]):
                profiles[key] = _profile_from_dict(saved)  # the memory phase's census of the same model
            else:  # on the device, as memory_profile does
                profiles[key] = est.activation_profile(mcfg, precision, device=spec.get("device", "cpu"))
        num_params = sum(p.numel() for p in build_model(mcfg).parameters())
        z, frames = systems.load_frames(run["data"], run["batch"])
        edges = max(systems.count_edges(f, cfg.model.cutoff) for f in frames)
        lev = cfg.memory
        e = est.estimate(cfg, profiles[key], lev, atoms=len(z), edges=edges, batch=run["batch"], num_params=num_params,
                         zero_stage=cfg.deepspeed.zero_stage, ranks=1)
        out[run["name"]] = {"estimated_peak_bytes": int(e.peak_bytes), "levers": lev.label(), "atoms": int(len(z)),
                            "edges_per_molecule": int(edges), "zero_stage": cfg.deepspeed.zero_stage}
    Path(out_path).write_text(json.dumps(out, indent=1,
                                         default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))
    return 0


def _model_key(model: dict) -> dict:
    return {k: v for k, v in model.items() if k not in ("avg_num_neighbors", "avg_num_atoms")}


def _profile_from_dict(d: dict):
    from scalable_equiformer.profiling.estimate import ActivationProfile, Linear

    return ActivationProfile(**{k: (Linear(**v) if isinstance(v, dict) else v) for k, v in d.items()})


def _compile_runs(r: Runner) -> list:
    """(name, bench_model arguments, minimum seconds worth starting it with)."""
    aspirin = str(ROOT / "scalable_equiformer" / "demo_data" / "aspirin_xtb_500K.npz")
    common = ["tools/bench_model.py", "--data", aspirin, "--modes", "train_step", "--compile", "compare",
              "--device", r.args.device]
    if r.cuda:
        return [("tiny_b8", common + ["--tiny", "--batch-size", "8", "--repeats", "5"], 20.0),
                ("paper_b8", common + ["--batch-size", "8", "--repeats", "3"], 60.0)]
    return [("tiny_b2_dynamo_only", common + ["--tiny", "--batch-size", "2", "--repeats", "1", "--size-probe",
                                              "--compile-backend", "eager"], 5.0)]


def phase_compile(r: Runner, timeout: float) -> dict:
    t_end = time.monotonic() + timeout
    out = {"data_note": "train_step of tools/bench_model.py on the shipped GFN2-xTB aspirin frames (21 atoms); "
                        "compiled = train.compile=true (training/compiled.py), eager = the plain autograd path",
           "runs": []}
    runs = _compile_runs(r)
    for i, (name, args, least) in enumerate(runs):
        left = t_end - time.monotonic()
        limit = left / 2 if (i == 0 and len(runs) > 1) else left
        rec = {"name": name}
        out["runs"].append(rec)
        if limit < least:
            rec.update(status="skipped", error=f"no time left ({left:.0f} s)")
            continue
        doc = r.work / f"compile_{name}.json"
        res = r.call([r.python] + args + ["--json", doc], limit)
        rec["seconds"] = res["seconds"]
        if doc.is_file():
            d = json.loads(doc.read_text())
            entry = d["datasets"][0]
            m = entry["modes"]["train_step"]
            rec.update(model=entry["model"], atoms=entry["atoms"], batch=d["batch_size"],
                       backend=d.get("compile_backend"),
                       eager_s=m["eager"]["median_s"], compiled_s=m["compiled"]["median_s"],
                       compiled_over_eager=m["ratio_compiled_over_eager"],
                       cold_compile_s=m["compile"]["first_step_s"], trace_s=m["compile"]["trace_s"],
                       size_probe=[{k: p[k] for k in ("atoms", "molecules", "graphs_compiled", "first_step_s")}
                                   for p in m.get("size_probe", [])])
        rec.update(_status(res, ok=doc.is_file()))
        r.say(f"  {name}: {rec['status']}"
              + (f", compiled/eager {rec['compiled_over_eager']:.3f}, cold compile "
                 f"{rec['cold_compile_s']:.0f} s" if rec.get("compiled_over_eager") else ""))
    first = out["runs"][0] if out["runs"] else {}
    if first.get("status") != "ok":
        out.update(status="failed", error=f"{first.get('name', 'no run')}: {first.get('error', 'not run')}")
    elif any(x.get("status") != "ok" for x in out["runs"]):
        out["note"] = "; ".join(f"{x['name']}: {x['status']}" for x in out["runs"] if x.get("status") != "ok")
    return out


def phase_tp(r: Runner, timeout: float) -> dict:
    doc_path = r.work / "tp.json"
    # the tool stops starting cases at its budget; the rest of the limit covers start-up and one case
    budget = max(timeout * (0.6 if r.cuda else 0.5) - 10.0, 5.0)
    res = r.call([r.python, "benchmarks/gpu/tp_bench.py", "--device", r.args.device, "--budget", f"{budget:.0f}",
                  "--out", doc_path], timeout)
    out = {"seconds_tool": res["seconds"]}
    if not doc_path.is_file():
        out.update(_status(res, ok=False))
        return out
    doc = json.loads(doc_path.read_text())
    out.update({k: doc[k] for k in ("device", "model", "parameters", "repeats", "implementations", "cueq_available",
                                    "cueq_cuda_ops", "cueq_method", "runs", "markdown") if k in doc})
    out.update(_status(res))
    first = doc["runs"][0]["results"] if doc.get("runs") else {}
    bad = [i for i in ("e3nn", "fast", "cueq") if first.get(i, {}).get("status") != "ok"]
    if out.get("status") == "ok" and bad:
        out.update(status="failed",
                   error=f"first case: {', '.join(bad)} not ok "
                         f"({'; '.join(str(first.get(i, {}).get('error', 'not run')) for i in bad)[:500]})")
    if r.cuda and doc.get("cueq_method") not in (None, "uniform_1d"):
        out["note"] = f"cueq ran the {doc.get('cueq_method')} method, not the uniform_1d CUDA kernel"
    ok_runs = sum(all(v.get("status") == "ok" for v in c["results"].values()) for c in doc.get("runs", []))
    r.say(f"  tensor products: {ok_runs} of {len(doc.get('runs', []))} cases with every implementation; "
          f"cueq method {doc.get('cueq_method')}")
    return out


def phase_report(r: Runner, timeout: float) -> dict:
    out = {}
    prof = r.out / "memory_profile.json"
    r.write_summary()  # --report reads it
    if prof.is_file():
        page = r.out / ("memory_cuda.md" if r.cuda else "memory_cpu.md")
        res = r.call([r.python, "tools/memory_tables.py", prof, "--report", "--summary", r.out / "summary.json"],
                     timeout / 2, stdout_file=page)
        if res["rc"] == 0:
            out["page"] = page.name
            tp = r.summary["phases"].get("tp", {})
            if tp.get("markdown"):  # the tensor products' table, for the same page of benchmarks/
                with page.open("a") as f:
                    f.write("\n" + tp["markdown"])
        else:
            page.unlink(missing_ok=True)
            out.update(_status(res))
        if r.cuda:
            res = r.call([r.python, "tools/memory_tables.py", prof, "--cuda-factors", r.out / "time_factors_cuda.json"],
                         timeout / 2)
            out["cuda_time_factors"] = "time_factors_cuda.json" if res["rc"] == 0 else _tail(res["output"], 3)
        else:
            out["cuda_time_factors"] = "none: a CPU run has no CUDA figures"
    else:
        out.update(status="failed", error="no memory_profile.json to report on")
    return out


def write_markdown(r: Runner) -> None:
    s = r.summary
    env = s.get("env", {})
    lines = [f"# benchmarks/gpu/run.sh --device {s['device_arg']}", "",
             f"{env.get('gpu', 'no GPU')} ({(env.get('gpu_total_memory_bytes') or 0) / GiB:.1f} GiB), torch "
             f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), NCCL {env.get('nccl', '-')}, python "
             f"{env.get('python', '?')}; git {env.get('git', '?')}; started {s['started']}, {s.get('wall_s')} s of a "
             f"{s['budget_s']:.0f} s budget.", "",
             f"Wheels: {s['install']['status']}; installed: {' '.join(s['install']['installed']) or '-'}; "
             f"already there: {' '.join(s['install']['already_there']) or '-'}.", "",
             "| phase | status | seconds | time limit | note |", "|---|---|---|---|---|"]
    for name in PHASES:
        p = s["phases"].get(name, {"status": "not reached"})
        note = (p.get("error") or "").splitlines()[0][:120] if p.get("error") else ""
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', '-')} | {p.get('budget_s', '-')} | {note} |")
    mem = s["phases"].get("memory", {})
    fit = mem.get("fit")
    if fit:
        mem_gib = (f"{fit['device_memory_gib']} GiB" if fit["device_memory_gib"]
                   else "the device's memory (none: a CPU run)")
        lines += ["", f"## Does {fit['atoms']} atoms x batch {fit['batch']} fit in {mem_gib}?", "",
                  f"Without levers: {fit['without_levers']}; lever sets that fit: "
                  f"{', '.join(fit['with_levers_that_fit']) or 'none'}.", "",
                  "| levers | measured peak GiB | fits | estimate GiB |", "|---|---|---|---|"]
        for k, v in fit["per_lever_set"].items():
            peak = ("out of memory" if v.get("oom")
                    else (v["peak_gib"] if v.get("peak_gib") is not None else v.get("why")))
            lines.append(f"| {k} | {peak} | {v['fits']} | {v['estimate_gib']} |")
    if mem.get("plan"):
        lines += ["", f"Plan for {mem['plan']['budget_gib']} GiB: "
                      f"`{' '.join('--set ' + o for o in mem['plan']['overrides'])}` "
                      f"(time factors: {mem['plan']['time_factors']})."]
    comp = s["phases"].get("compile", {})
    if comp.get("runs"):
        lines += ["", "## train.compile: compiled vs eager training step", "", comp.get("data_note", ""), "",
                  "| run | model | backend | atoms | eager s | compiled s | compiled/eager | cold compile s | "
                  "other sizes: graphs compiled | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in comp["runs"]:
            def f(k, fmt, x=x):
                return fmt.format(x[k]) if x.get(k) is not None else "-"
            probe = ", ".join(f"{p['atoms']} atoms: {p['graphs_compiled']}" for p in x.get("size_probe", [])) or "-"
            lines.append(f"| {x['name']} | {x.get('model', '-')} | {x.get('backend', '-')} | {x.get('atoms', '-')} | "
                         f"{f('eager_s', '{:.4f}')} | {f('compiled_s', '{:.4f}')} | "
                         f"{f('compiled_over_eager', '{:.3f}')} | "
                         f"{f('cold_compile_s', '{:.1f}')} | {probe} | {x.get('status')} |")
    tp = s["phases"].get("tp", {})
    if tp.get("markdown"):
        lines += ["", tp["markdown"].rstrip()]
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from memory_tables import summary_sections

        lines += ["", summary_sections(s)]
    except Exception as exc:  # noqa: BLE001
        lines += ["", f"(tests / training sections unavailable: {exc})"]
    lines += ["", f"Memory tables: {s['phases'].get('report', {}).get('page', '-')}; "
                  "every subprocess's output: run.log."]
    (r.out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--budget", type=float, help="seconds for all phases (default: 540 cuda, 460 cpu)")
    p.add_argument("--out", help="output folder (default $OUT)")
    p.add_argument("--work", help="folder for run folders and data (default: a temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder")
    p.add_argument("--python", help="python for the phases (default: this one)")
    p.add_argument("--prepare-train", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare_train:
        return prepare_train(*args.prepare_train)
    args.out = args.out or os.environ.get("OUT")
    if not args.out:
        p.error("give --out DIR (or set OUT)")
    if args.budget is None:
        args.budget = 540.0 if args.device == "cuda" else 460.0
    r = Runner(args)
    r.say(f"run.py --device {args.device}: budget {args.budget:.0f} s, output {r.out}, work {r.work}")
    try:
        r.phase("env", lambda t: phase_env(r, t))
        r.phase("tests", lambda t: phase_tests(r, t))
        r.phase("memory", lambda t: phase_memory(r, t))
        r.phase("train", lambda t: phase_train(r, t))
        r.phase("compile", lambda t: phase_compile(r, t))
        r.phase("tp", lambda t: phase_tp(r, t))
        r.phase("report", lambda t: phase_report(r, t))
    finally:
        r.write_summary()
        write_markdown(r)
        if not args.keep_work and not args.work:
            shutil.rmtree(r.work, ignore_errors=True)
    ok = all(x.get("status") == "ok" for x in r.summary["phases"].values())
    r.say(f"done: {'every phase ok' if ok else 'some phase not ok'}; {r.out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
