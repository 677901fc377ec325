#!/usr/bin/env python
"""One training step of the ORIGINAL Equiformer, measured as ``memory_profile.py --meter alloc``
measures this project's: run in a venv with e3nn 0.4.4 (what the original pins) next to a clone of
atomicarchitects/equiformer (see run.sh).

    python step.py --repo EQUIFORMER_CLONE --molecules M.npz --json original.json

Model: ``graph_attention_transformer_nonlinear_exp_l2_md17`` with its aspirin script's arguments
(the paper's MD17 Lmax-2 model, 3.50 M parameters), fp32, train mode; step: its ``main_md17.py``
recipe (energy and forces with ``create_graph``, loss = 1 * L2MAE(E) + 80 * L2MAE(F), backward,
AdamW). One warm-up step on 8 atoms (libraries, optimizer state), gradients set to None, then the
peak of live tensor bytes over one step from the profiler's allocation events, minus the gradient
bytes: the activation figure of ``memory_profile.py`` (``activation_bytes``). CPU seconds are
timed over two more steps without the profiler. torch_cluster and torch_scatter are replaced by
the pure-torch stand-ins in ``shims/`` (the same radius graph and sums).

``--speed`` (run.sh's side-by-side timing, ``this_step.py`` is this project's side): no memory
meter; per molecule (``--molecule``, default all) one warm-up of each step on the molecule's first
8 atoms, then ``--steps`` timed training steps (as above) and ``--steps`` timed inference steps
(eval mode, energy and forces, no ``create_graph``: the original's forward hard-codes
``create_graph=True``, so ``torch.autograd.grad`` is called with ``create_graph=False`` during the
inference step, the same work as this project's evaluation; as shipped, its ``evaluate`` keeps the
double-backward graph and is slower than this). Process CPU time and wall time of each step.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def peak_live_bytes(fn) -> int:
    """Peak of live CPU tensor bytes over fn() (the logic of profiling.meter.AllocationMeter)."""
    prof = torch.profiler
    with prof.profile(activities=[prof.ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e for e in p.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a clone of atomicarchitects/equiformer")
    ap.add_argument("--molecules", required=True, help="molecules.py's npz")
    ap.add_argument("--json", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="time training and inference steps (no memory meter)")
    ap.add_argument("--molecule", nargs="*", default=None, help="with --speed: these molecules of the npz only")
    ap.add_argument("--steps", type=int, default=2, help="with --speed: timed steps per mode (default 2)")
    args = ap.parse_args()
    sys.path[:0] = [str(HERE / "shims"), str(Path(args.repo).resolve())]
    torch.set_num_threads(args.threads)
    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 loads its constants with torch.load
    import importlib
    import types

    nets = types.ModuleType("nets")  # skip nets/__init__.py: it imports the OC20 models' dependencies too
    nets.__path__ = [str(Path(args.repo).resolve() / "nets")]
    sys.modules["nets"] = nets
    make = importlib.import_module("nets.graph_attention_transformer_md17").graph_attention_transformer_nonlinear_exp_l2_md17

    mols = np.load(args.molecules)
    if args.speed:
        return speed(args, make, mols)
    runs = []
    for name in [k[2:] for k in mols.files if k.startswith("z_")]:
        z, pos = mols[f"z_{name}"], mols[f"pos_{name}"]
        torch.manual_seed(0)
        model = make(irreps_in="64x0e", radius=5.0, num_basis=32, atomref=None, task_mean=0.0, task_std=1.0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6)

        def step(z=z, pos=pos, model=model, opt=opt):
            zt = torch.as_tensor(z, dtype=torch.long)
            p = torch.as_tensor(pos, dtype=torch.float32)
            e, f = model(node_atom=zt, pos=p, batch=torch.zeros(len(zt), dtype=torch.long))
            loss = torch.norm(e, dim=-1).mean() + 80.0 * torch.norm(f, dim=-1).mean()  # L2MAE against zero targets
            loss.backward()
            opt.step()

        step(z[:8], pos[:8])
        opt.zero_grad(set_to_none=True)
        grads = sum(q.numel() * q.element_size() for q in model.parameters())
        peak = peak_live_bytes(step)
        times = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            t0 = time.process_time()
            step()
            times.append(time.process_time() - t0)
        import torch_cluster

        edges = int(torch_cluster.radius_graph(torch.as_tensor(pos), 5.0).shape[1])
        run = {"molecule": name, "atoms": int(len(z)), "edges": edges, "activation_bytes": int(peak - grads),
               "step_cpu_seconds": min(times), "num_params": sum(q.numel() for q in model.parameters())}
        print(json.dumps(run), flush=True)
        runs.append(run)
    Path(args.json).write_text(json.dumps({"implementation": "original Equiformer", "repo": str(args.repo),
                                           "threads": args.threads, "method": "cpu_alloc_events", "runs": runs}, indent=1))
    return 0


def _no_create_graph(grad):
    def call(*a, **kw):
        kw["create_graph"] = False
        return grad(*a, **kw)
    return call


def speed(args, make, mols) -> int:
    """``--speed``: training and inference steps timed (see the module docstring)."""
    import torch_cluster

    names = args.molecule or [k[2:] for k in mols.files if k.startswith("z_")]
    runs = []
    for name in names:
        z, pos = mols[f"z_{name}"], mols[f"pos_{name}"]
        torch.manual_seed(0)
        model = make(irreps_in="64x0e", radius=5.0, num_basis=32, atomref=None, task_mean=0.0, task_std=1.0)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6)

        def train(z=z, pos=pos):
            model.train()
            zt = torch.as_tensor(z, dtype=torch.long)
            e, f = model(node_atom=zt, pos=torch.as_tensor(pos, dtype=torch.float32), batch=torch.zeros(len(zt), dtype=torch.long))
            loss = torch.norm(e, dim=-1).mean() + 80.0 * torch.norm(f, dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer(z=z, pos=pos):
            model.eval()
            zt = torch.as_tensor(z, dtype=torch.long)
            grad = torch.autograd.grad
            torch.autograd.grad = _no_create_graph(grad)
            try:
                e, f = model(node_atom=zt, pos=torch.as_tensor(pos, dtype=torch.float32), batch=torch.zeros(len(zt), dtype=torch.long))
            finally:
                torch.autograd.grad = grad
            assert not f.requires_grad
            return float(e.detach().sum()), f.detach()

        train(z[:8], pos[:8])
        infer(z[:8], pos[:8])
        run = {"molecule": name, "atoms": int(len(z)),
               "edges": int(torch_cluster.radius_graph(torch.as_tensor(pos), 5.0).shape[1]),
               "num_params": sum(q.numel() for q in model.parameters())}
        for mode, fn in (("train", train), ("infer", infer)):
            cpu, wall = [], []
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
            run[f"{mode}_cpu_s"], run[f"{mode}_wall_s"] = cpu, wall
        print(json.dumps(run), flush=True)
        runs.append(run)
    Path(args.json).write_text(json.dumps({"implementation": "original", "repo": str(args.repo), "threads": args.threads,
                                           "torch": torch.__version__, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
