#!/usr/bin/env python
"""This project's side of run.sh's speed comparison (``step.py --speed`` is the original's):
training and inference steps of the paper's MD17 model, timed, on molecules.py's molecules.

    python this_step.py --molecules M.npz --molecule aspirin --checkpointing none --json out.json

Model and recipe: ``configs/md17_aspirin.yaml`` (the paper's Lmax-2 model, 3.50 M parameters,
fp32, L2MAE loss 1:80), with ``memory.checkpointing`` set (none: every lever off; forces:
force-aware checkpointing) and every other lever off. Training step: the trainer's own,
``profiling.measured_step.make_step`` (``training.steps.optimizer_step`` with the trainer's
``PlainEngine``: forward, forces with ``create_graph``, loss, backward, AdamW); inference step:
evaluation's call, ``training.steps.model_call`` on the model under its levers in eval mode
(energy and forces, no ``create_graph``). One warm-up of each on the molecule's first 8 atoms, then
``--steps`` timed steps of each: process CPU time and wall time, one thread.

``--package-root DIR``: import ``scalable_equiformer`` from another checkout (run.sh's ``BEFORE``:
the code before a change, measured in the same run as the code after it); ``--label``: the
implementation's name in the JSON (default: "this, levers off" / "this, checkpointing=forces").
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molecules", required=True, help="molecules.py's npz")
    ap.add_argument("--molecule", nargs="*", default=None, help="these molecules of the npz only (default all)")
    ap.add_argument("--checkpointing", choices=("none", "forces"), default="none")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode (default 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True)
    ap.add_argument("--package-root", default=str(Path(__file__).resolve().parents[2]),
                    help="the checkout whose scalable_equiformer is measured (default: this one)")
    ap.add_argument("--label", default=None, help="the implementation's name in the JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.package_root).resolve()))
    torch.set_num_threads(args.threads)

    from scalable_equiformer.config import load_config
    from scalable_equiformer.memory import with_levers
    from scalable_equiformer.profiling import measured_step, systems
    from scalable_equiformer.training.steps import model_call

    mols = np.load(args.molecules)
    names = args.molecule or [k[2:] for k in mols.files if k.startswith("z_")]
    runs = []
    for name in names:
        z, pos = mols[f"z_{name}"], mols[f"pos_{name}"]
        cfg = load_config("md17_aspirin", ["data.name=synthetic", f"memory.checkpointing={args.checkpointing}"])
        torch.manual_seed(0)
        model, dtype = measured_step.build(cfg, torch.device("cpu"), len(z))
        train_step, _engine = measured_step.make_step(model, cfg)
        evaluator = with_levers(model, cfg.memory)

        def infer(batch):
            evaluator.eval()
            out = model_call(evaluator, batch, cfg)
            assert not out["forces"].requires_grad
            evaluator.train()
            return out

        def train(batch):
            model.train()
            return train_step(batch)

        small = measured_step.make_batch(z[:8], pos[None, :8], dtype, torch.device("cpu"))
        batch = measured_step.make_batch(z, pos[None], dtype, torch.device("cpu"))
        train(small)
        infer(small)
        run = {"molecule": name, "atoms": int(len(z)), "edges": int(systems.count_edges(pos, 5.0)),
               "num_params": sum(q.numel() for q in model.parameters())}
        for mode, fn in (("train", train), ("infer", infer)):
            cpu, wall = [], []
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(batch)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
            run[f"{mode}_cpu_s"], run[f"{mode}_wall_s"] = cpu, wall
        print(json.dumps(run), flush=True)
        runs.append(run)
    impl = args.label or ("this, levers off" if args.checkpointing == "none" else f"this, checkpointing={args.checkpointing}")
    import scalable_equiformer

    Path(args.json).write_text(json.dumps({"implementation": impl, "checkpointing": args.checkpointing,
                                           "package": str(Path(scalable_equiformer.__file__).parent),
                                           "threads": args.threads, "torch": torch.__version__, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
