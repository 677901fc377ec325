#!/usr/bin/env python
"""The three depth-wise tensor product implementations (``model.tensor_product``: e3nn, fast, cueq)
timed on the same steps, with peak memory: the ``tp`` phase of ``benchmarks/gpu/run.sh``.

    python benchmarks/gpu/tp_bench.py --device cuda --out tp.json [--budget SECONDS] [--repeats N]

One model (the paper's MD17 model at lmax 2, fp32; ``--device cpu``: the tiny model) whose
implementation is switched between runs (``nn.tensor_product.set_tensor_product``: same weights).
Systems: aspirin batch 8 (the shipped GFN2-xTB aspirin frames), AT-AT batch 1 and 4 (the shipped
AT-AT frames); ``--device cpu``: aspirin batch 2, AT-AT batch 1 and 2. Steps: ``train`` (energy,
forces with ``create_graph``, ``loss.backward()``: what a training step computes, no optimizer)
and ``infer`` (``model.eval()``, energy and forces, no graph kept). Precision fp32 and bf16
(``memory.precision=bf16``'s autocast); a bf16 row carries the relative error of its forces
against fp32 ``fast`` (norm of the difference over the norm) and ``correct``: within the bf16
tolerance of tests/test_memory_levers.py (0.05). cuEquivariance's double backward is not tested by
its authors in 16-bit, hence the check rather than trust.

Per case and implementation: the median of ``--repeats`` timed steps after two warm-ups (one on
the CPU), CUDA
``max_memory_allocated`` over the timed steps (``null`` on the CPU), and for cueq the method its
products run (``uniform_1d``: the CUDA kernel; ``naive``: PyTorch ops, the CPU fallback or a CUDA
machine without ``cuequivariance-ops-torch-cu12``). Cases run while ``--budget`` lasts; the rest
are recorded as ``skipped``. Writes ``--out`` (JSON) and prints the markdown table
(:func:`markdown`), which ``run.py`` puts into summary.md and the memory page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

IMPLEMENTATIONS = ("e3nn", "fast", "cueq")
BF16_FORCE_TOLERANCE = 0.05  # tests/test_memory_levers.py TOLERANCE_16["bf16"][0]


def _systems(cpu: bool) -> list:
    from scalable_equiformer.profiling import systems

    cases = [("aspirin", systems.ASPIRIN_FILE, 2 if cpu else 8), ("atat", systems.ATAT_FILE, 1),
             ("atat", systems.ATAT_FILE, 2 if cpu else 4)]
    out = []
    for name, path, batch in cases:
        z, frames = systems.load_frames(path, batch)
        out.append((f"{name}_b{batch}", z, frames))
    return out


def _model(cpu: bool, device):
    from scalable_equiformer.config import ModelConfig
    from scalable_equiformer.model import build_model
    from scalable_equiformer.presets import paper_model_dict, tiny_model_dict

    kw = tiny_model_dict() if cpu else paper_model_dict()
    kw.update(avg_num_neighbors=15.0, avg_num_atoms=30.0, energy_normalization="per_atom_mean_force_rms")
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw)).to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, batch, mode: str, precision: str, device):
    from scalable_equiformer.memory import ForceRunner, Levers
    from scalable_equiformer.memory.precision import autocast

    training = mode == "train"
    model.train(training)
    model.zero_grad(set_to_none=True)
    with autocast(precision, device.type):
        out = ForceRunner(Levers("none"))(model, batch, training=training)
    if training:
        loss = out["energy"].float().abs().sum() + out["forces"].float().pow(2).mean()
        loss.backward()
    return out["forces"].detach().float()


def _measure(model, batch, mode, precision, device, repeats):
    for _ in range(2 if device.type == "cuda" else 1):
        forces = _step(model, batch, mode, precision, device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _step(model, batch, mode, precision, device)
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "times": [round(x, 6) for x in times], "peak_bytes": peak}, forces


def _cueq_method(model, device) -> str:
    from scalable_equiformer.nn.tensor_product import DepthwiseTensorProduct

    methods = {m._cueq.method(device) for m in model.modules() if isinstance(m, DepthwiseTensorProduct) and m._cueq}
    return "+".join(sorted(methods))


def run(device: torch.device, budget: float, repeats: int) -> dict:
    from scalable_equiformer.nn import tensor_product_cueq
    from scalable_equiformer.nn.tensor_product import set_tensor_product
    from scalable_equiformer.profiling.measured_step import make_batch

    t0 = time.monotonic()
    cpu = device.type != "cuda"
    model = _model(cpu, device)
    impls = [i for i in IMPLEMENTATIONS if i != "cueq" or tensor_product_cueq.available()]
    doc = {"device": str(device) if cpu else f"cuda ({torch.cuda.get_device_name(device)})", "torch": torch.__version__,
           "model": "tiny (configs/tiny.yaml)" if cpu else "paper MD17 lmax 2 (3.50 M parameters)",
           "parameters": sum(p.numel() for p in model.parameters()), "repeats": repeats,
           "implementations": impls, "cueq_available": tensor_product_cueq.available(),
           "cueq_cuda_ops": tensor_product_cueq.has_cuda_ops(), "runs": []}
    if "cueq" in impls:
        set_tensor_product(model, "cueq")
        doc["cueq_method"] = _cueq_method(model, device)
    for name, z, frames in _systems(cpu):
        batch = make_batch(z, frames, torch.float32, device)
        for precision in ("fp32", "bf16"):
            for mode in ("train", "infer"):
                case = {"system": name, "atoms": int(len(z)), "batch": int(len(frames)), "precision": precision,
                        "mode": mode, "results": {}}
                doc["runs"].append(case)
                ref = None
                for impl in (["fast"] + [i for i in impls if i != "fast"]):  # fast first: the bf16 reference
                    if time.monotonic() - t0 > budget:
                        case["results"][impl] = {"status": "skipped", "error": "no time left in the budget"}
                        continue
                    set_tensor_product(model, impl)
                    try:
                        res, forces = _measure(model, batch, mode, precision, device, repeats)
                    except Exception as exc:  # noqa: BLE001 - one failing implementation does not stop the others
                        case["results"][impl] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
                        continue
                    if precision == "fp32" and impl == "fast":
                        doc.setdefault("_ref", {})[(name, mode)] = forces
                    ref = doc.get("_ref", {}).get((name, mode))
                    if ref is not None:
                        err = float((forces.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
                        res["force_error_vs_fp32_fast"] = err
                        if precision == "bf16":
                            res["correct"] = err <= BF16_FORCE_TOLERANCE
                    case["results"][impl] = {"status": "ok", **res}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    doc.pop("_ref", None)
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    return doc


def markdown(doc: dict) -> str:
    """The table: per case, each implementation's median step time and peak, and the ratios to e3nn."""
    impls = doc["implementations"]
    lines = [f"## Depth-wise tensor products: {', '.join(impls)} (model.tensor_product)", "",
             f"{doc['device']}, torch {doc['torch']}, {doc['model']}; median of {doc['repeats']} steps after "
             f"warm-ups; peak = max_memory_allocated over the timed steps. "
             f"cueq method: {doc.get('cueq_method', 'not installed')}"
             f" (uniform_1d = the CUDA kernel, naive = PyTorch ops). bf16 rows: force error against fp32 fast.", "",
             "| system | atoms | batch | step | precision | " + " | ".join(f"{i} s" for i in impls)
             + " | " + " | ".join(f"{i} peak MiB" for i in impls)
             + " | " + " | ".join(f"e3nn/{i}" for i in impls if i != "e3nn")
             + " | bf16 force error |",
             "|" + "---|" * (5 + 2 * len(impls) + len(impls) - 1 + 1)]
    for case in doc["runs"]:
        res = case["results"]

        def sec(i):
            r = res.get(i, {})
            return f"{r['seconds']:.4f}" if r.get("status") == "ok" else r.get("status", "-")

        def peak(i):
            r = res.get(i, {})
            return f"{r['peak_bytes'] / 2**20:.0f}" if r.get("status") == "ok" and r.get("peak_bytes") else "-"

        def ratio(i):
            a, b = res.get("e3nn", {}), res.get(i, {})
            return f"{a['seconds'] / b['seconds']:.2f}" if a.get("status") == b.get("status") == "ok" else "-"

        errs = ", ".join(f"{i} {res[i]['force_error_vs_fp32_fast']:.1e}"
                         f"{'' if res[i].get('correct', True) else ' (over 0.05)'}"
                         for i in impls if case["precision"] == "bf16" and "force_error_vs_fp32_fast" in res.get(i, {}))
        lines.append(f"| {case['system']} | {case['atoms']} | {case['batch']} | {case['mode']} | {case['precision']} | "
                     + " | ".join(sec(i) for i in impls) + " | " + " | ".join(peak(i) for i in impls) + " | "
                     + " | ".join(ratio(i) for i in impls if i != "e3nn") + f" | {errs or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; cases past it are recorded as skipped")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5 on CUDA, 1 on the CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tp_bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    np.random.seed(0)
    doc = run(device, args.budget, args.repeats or (5 if device.type == "cuda" else 1))
    doc["markdown"] = markdown(doc)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
