#!/usr/bin/env python
"""Import a checkpoint of the original Equiformer code (``*.pth.tar``) as a scalable_equiformer checkpoint.

    python tools/import_original.py CKPT.pth.tar --config md17_aspirin --energy-mean M --energy-std S --out model.pt
    python tools/import_original.py CKPT.pth.tar --config md17_aspirin --data md17_aspirin.npz --out model.pt

The original normalises its targets by the mean ``M`` and standard deviation ``S`` of the total
energies of its training split and stores neither: give them (in the original's dataset units,
kcal/mol for its MD17 loader; ``--units eV`` otherwise), or ``--data FILE`` to compute them from
the original's own split of that file (the config's ``data.train_size`` / ``val_size`` / ``seed``:
950 / 50 / 1 for MD17, the same permutation as the original). The output loads in
``tools/evaluate.py``, ``EquiformerCalculator`` and ``train.py --set train.init_from=model.pt``.

``--config`` must describe the original's architecture and function (``configs/md17_*``: the
original's constants, no smooth cutoff, ``energy_normalization: total_mean_std``); its
``model.dtype`` is the dtype of the written weights (``--set model.dtype=float64`` for float64).
Float32 and float64 checkpoints, EMA copies (``module.`` prefix) and the e3nn 0.4 / >= 0.5
Clebsch-Gordan sign conventions (read from the file's own buffers) are handled; anything that does
not map is refused with one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from scalable_equiformer.cli import (
        ArgumentParser, add_set_argument, finite_float, output_file, positive_float, positive_int,
    )

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="the original's checkpoint (*.pth.tar: {'state_dict': ...})")
    p.add_argument("--config", required=True,
                   help="config file or name in configs/ with the original's architecture (e.g. md17_aspirin)")
    add_set_argument(p, help="config overrides, e.g. --set model.dtype=float64 (repeatable)")
    p.add_argument("--out", required=True, type=output_file, help="where to write the imported checkpoint (.pt)")
    p.add_argument("--energy-mean", type=finite_float, default=None,
                   help="mean total energy of the original's training split")
    p.add_argument("--energy-std", type=positive_float, default=None,
                   help="standard deviation of the total energies of the original's training split")
    p.add_argument("--units", choices=["kcal/mol", "eV"], default="kcal/mol",
                   help="units of --energy-mean/--energy-std")
    p.add_argument("--num-atoms", type=positive_int, default=None,
                   help="atoms of the molecule (default: from --data, or the config's catalog dataset)")
    p.add_argument("--data", default=None, help="compute mean and std from the original's training split of this file")
    p.add_argument("--root", default=None, help="data folder for catalog names (default: the config's data.root)")
    p.add_argument("--elements", default=None, metavar="H,C,O",
                   help="elements of the original's training data (default: those of --data; else not recorded, "
                        "and the calculator cannot refuse elements the model never saw)")
    args = p.parse_args(argv)
    if args.data is None and (args.energy_mean is None or args.energy_std is None):
        p.error("give --energy-mean and --energy-std, or --data FILE to compute them")
    if args.data is not None and (args.energy_mean is not None or args.energy_std is not None):
        p.error("give either --data or --energy-mean/--energy-std, not both")
    return args


def run(args) -> Path:
    from scalable_equiformer.config import load_config
    from scalable_equiformer.data import KCAL_PER_EV
    from scalable_equiformer.errors import UserError
    from scalable_equiformer.original import import_original, imported_payload
    from scalable_equiformer.training.checkpoint import save_checkpoint

    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    source = {"file": str(Path(args.checkpoint).resolve()), "config": str(args.config)}
    force_rms = None
    if args.data is not None:
        from scalable_equiformer.data import load_dataset, make_splits
        from scalable_equiformer.data.statistics import compute_statistics

        ds = load_dataset(args.data, root=args.root or config.data.root)
        d = config.data
        splits = make_splits(len(ds), d.train_size, d.val_size, d.test_size, d.seed, source=args.data)
        import torch

        stats = compute_statistics(torch.utils.data.Subset(ds, splits["train"].tolist()), config.model.cutoff)
        mean, std, num_atoms, force_rms = stats.energy_mean, stats.energy_std, stats.num_atoms, stats.force_rms
        if num_atoms is None:
            raise UserError(f"{args.data}: frames with different atom counts: "
                            "the original's normalisation needs one molecule")
        source.update(data=str(args.data), train_size=d.train_size, val_size=d.val_size, seed=d.seed)
    else:
        factor = 1.0 / KCAL_PER_EV if args.units == "kcal/mol" else 1.0
        mean, std = args.energy_mean * factor, args.energy_std * factor
        num_atoms = args.num_atoms
        if num_atoms is None:
            from scalable_equiformer.data.catalog import get_info

            if config.data.name is None:
                raise UserError("--num-atoms is needed: the config names no catalog dataset to take it from")
            num_atoms = get_info(config.data.name).num_atoms
        source.update(energy_mean=args.energy_mean, energy_std=args.energy_std, units=args.units)
    elements = None
    if args.data is not None:
        elements = sorted({int(x) for x in ds.z.reshape(-1).tolist()})
    if args.elements is not None:
        from ase.data import atomic_numbers

        names = [e.strip() for e in args.elements.split(",") if e.strip()]
        unknown = [e for e in names if e not in atomic_numbers]
        if unknown or not names:
            raise UserError(f"--elements {args.elements!r}: not chemical symbols: "
                            f"{', '.join(unknown) or '(none given)'}")
        elements = sorted({atomic_numbers[e] for e in names})
    if args.num_atoms is not None and args.num_atoms != num_atoms:
        raise UserError(f"--num-atoms {args.num_atoms} but the data has {num_atoms} atoms")
    model, stats = import_original(args.checkpoint, config, mean, std, num_atoms, force_rms)
    save_checkpoint(out, imported_payload(model, config, stats, source, elements))
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.checkpoint} -> {out}: {n:,} parameters, {config.model.dtype}; "
          f"energy mean {mean:.6f} eV, std {std:.6f} eV, {num_atoms} atoms")
    if elements is None:
        print("note: the training elements are not recorded (give --data or --elements H,C,O): the calculator and "
              "evaluate.py cannot refuse elements the model never saw")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from scalable_equiformer.cli import exit_on_user_error

    def go() -> int:
        run(args)
        return 0

    return exit_on_user_error(go)


if __name__ == "__main__":
    sys.exit(main())
