#!/usr/bin/env python
"""Evaluate a checkpoint on a dataset split: energy MAE (meV per molecule) and force MAE (meV/Å
per component), RMSEs, and kcal/mol twins.

    python tools/evaluate.py runs/<run>/best.pt --data md17_aspirin --root data
    python tools/evaluate.py runs/<run>/best.pt --data my.npz --split all --json out.json
    torchrun --nproc_per_node 2 tools/evaluate.py CKPT --data NAME   # frames shared over ranks, sums all-reduced

``--split test|val|train`` uses the run's ``splits.npz`` (next to the checkpoint) when the data is
the file the run trained on, else the seeded split of the checkpoint's config; ``all`` takes every
frame. Writes ``<checkpoint>.<data>.<split>.json`` unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a best.pt / last.pt, or a run folder (its best.pt)")
    p.add_argument("--data", required=True, help="dataset file or catalog name (e.g. md17_aspirin)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    p.add_argument("--root", default=None, help="data folder for catalog names (default: the checkpoint's data.root)")
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--batch-size", type=int, default=None, help="molecules per batch (default train.eval_batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-frames", type=int, default=None, help="evaluate only the first N frames of the split")
    args = p.parse_args(argv)

    from scalable_equiformer.errors import UserError

    try:
        metrics = evaluate_checkpoint(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if metrics is not None else 1


def evaluate_checkpoint(args) -> dict:
    import numpy as np

    from scalable_equiformer import runtime
    from scalable_equiformer.config import config_from_dict
    from scalable_equiformer.data import load_dataset, load_splits, make_splits
    from scalable_equiformer.data.statistics import DatasetStatistics
    from scalable_equiformer.errors import DataError
    from scalable_equiformer.model import build_model
    from scalable_equiformer.training import steps
    from scalable_equiformer.training.checkpoint import load_checkpoint, load_model_state, write_json
    from scalable_equiformer.training.metrics import UNITS_HEADER, evaluate
    from scalable_equiformer.training.trainer import resolve_data_path

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], origin=str(path))
    info, device = runtime.init_distributed(False, args.device)
    root = args.root if args.root is not None else cfg.data.root
    data_arg = args.data
    if Path(data_arg).suffix or "/" in data_arg:
        data_arg = resolve_data_path(data_arg, root)
    dataset = load_dataset(data_arg, root=root)
    stats = DatasetStatistics.from_dict(ckpt["stats"])
    with runtime.default_dtype(cfg.model.dtype):
        model = build_model(cfg, stats)
    steps.configure_model(model, cfg)
    load_model_state(model, ckpt["model"], path)
    model = model.to(device)

    n = len(dataset)
    if args.split == "all":
        indices = np.arange(n)
        split_note = "all frames"
    else:
        splits = None
        run_splits = path.parent / "splits.npz"
        same_file = (Path(str(dataset.path)).resolve().name == Path(str(cfg.data.path or "")).name) or \
            (cfg.data.name is not None and dataset.name == cfg.data.name)
        if run_splits.is_file() and same_file:
            try:
                splits = load_splits(run_splits, n_frames=n)
                split_note = f"{args.split} split of {run_splits}"
            except DataError:
                splits = None
        if splits is None:
            splits = make_splits(n, cfg.data.train_size, cfg.data.val_size, cfg.data.test_size, cfg.data.seed,
                                 source=dataset.path)
            split_note = f"{args.split} split drawn with the checkpoint's data config (seed {cfg.data.seed})"
        indices = np.asarray(splits[args.split])
    if args.max_frames is not None:
        indices = indices[: args.max_frames]
    if len(indices) == 0:
        raise DataError(f"{dataset.path}: the {args.split} split is empty")
    group_rank, group_world = info.rank, info.world_size
    if group_world > 1 and not info.initialized:
        raise DataError("several ranks but no process group")
    metrics = evaluate(model, dataset, indices, cfg, device, rank=group_rank, world=group_world,
                       batch_size=args.batch_size or cfg.train.eval_batch_size)
    out = {
        "checkpoint": str(path),
        "epoch": ckpt.get("epoch"),
        "data": str(dataset.path),
        "split": args.split,
        "split_source": split_note,
        **metrics,
        "units": "energy MAE meV per molecule; force MAE meV/Å per component; kcal/mol twins",
    }
    if info.is_main:
        print(UNITS_HEADER)
        print(f"{path} (epoch {ckpt.get('epoch')}) on {dataset.path} [{split_note}], {metrics['n_frames']} frames:")
        print(f"  energy MAE {metrics['energy_mae_meV']:.4f} meV   ({metrics['energy_mae_kcal_per_mol']:.5f} kcal/mol)   "
              f"RMSE {metrics['energy_rmse_meV']:.4f} meV")
        print(f"  force  MAE {metrics['force_mae_meV_per_A']:.4f} meV/Å ({metrics['force_mae_kcal_per_mol_per_A']:.5f} kcal/mol/Å) "
              f"RMSE {metrics['force_rmse_meV_per_A']:.4f} meV/Å")
        dest = Path(args.json) if args.json else path.with_name(f"{path.stem}.{Path(str(dataset.path)).stem}.{args.split}.json")
        write_json(dest, out)
        print(f"wrote {dest}")
    runtime.shutdown_distributed()
    return out


if __name__ == "__main__":
    sys.exit(main())
