#!/usr/bin/env python
"""Evaluate a checkpoint on a dataset split: energy MAE (meV per molecule) and force MAE (meV/Å
per component), RMSEs, and kcal/mol twins.

    python tools/evaluate.py runs/<run>/best.pt --data md17_aspirin --root data
    python tools/evaluate.py runs/<run>/best.pt --data my.npz --split all --json out.json
    torchrun --nproc_per_node 2 tools/evaluate.py CKPT --data NAME   # frames shared over ranks, sums all-reduced
    python tools/evaluate.py CKPT --data big.npz --partitions 4      # each molecule's graph over 4 ranks
    torchrun --nproc_per_node 4 tools/evaluate.py CKPT --data NAME --partitions 2   # 2 data-parallel x 2 partitions

``--partitions P`` splits every molecule's radius graph over P ranks (halo exchange before each
block; energies and forces equal the one-process model's to float rounding), for systems too big
for one process. Started by torchrun / deepspeed with W ranks, P must divide W: W / P
data-parallel groups share the frames, the P ranks of a group share each molecule. Started as a
plain ``python`` process, it runs P local CPU processes (gloo) itself; for GPUs start the ranks
with torchrun.

``--split test|val|train`` uses the run's ``splits.npz`` (next to the checkpoint) when the data is
the file the run trained on, else the seeded split of the checkpoint's config; ``all`` takes every
frame. Writes ``<checkpoint>.<data>.<split>.json`` unless ``--json`` is given; it prints the file it
writes. A file there from an earlier evaluation is replaced with a one-line warning naming what it
held (its checkpoint, epoch, split and force MAE); any other file there is refused, before evaluating.

Elements: a checkpoint records the elements of its training split. Data with an element the model
never saw is refused, naming the element (its energies would be finite and meaningless);
``--allow-unseen-elements`` evaluates anyway, with one warning per element. Checkpoints written
before elements were recorded are not checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, output_file, positive_int

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a best.pt / last.pt, or a run folder (its best.pt)")
    p.add_argument("--data", required=True, help="dataset file or catalog name (e.g. md17_aspirin)")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    p.add_argument("--root", default=None, help="data folder for catalog names (default: the checkpoint's data.root)")
    p.add_argument("--json", type=output_file, default=None, help="write the metrics to this file")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="molecules per batch, >= 1 (default train.eval_batch_size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="evaluate only the first N >= 1 frames of the split")
    p.add_argument("--partitions", type=positive_int, default=1,
                   help="split each molecule's graph over P >= 1 ranks (parallel.graph_partitions); without a "
                        "launcher, P local CPU processes are started")
    p.add_argument("--allow-unseen-elements", action="store_true",
                   help="evaluate data with elements the model never saw in training (warns) instead of refusing")
    args = p.parse_args(argv)

    from scalable_equiformer.errors import UserError

    try:
        metrics = evaluate_checkpoint(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if metrics is not None else 1


def evaluate_checkpoint(args) -> dict:
    from scalable_equiformer.errors import UserError
    from scalable_equiformer.parallel.launch import launched_ranks

    if args.partitions < 1:
        raise UserError(f"--partitions must be >= 1, not {args.partitions}")
    if args.json is not None and Path(args.json).is_dir():
        raise UserError(f"--json {args.json}: is a folder; give a file name, e.g. {Path(args.json) / 'metrics.json'}")
    if args.partitions > 1 and launched_ranks() == 1:
        return _evaluate_on_local_ranks(args)
    return _evaluate(args)


def _evaluate_on_local_ranks(args) -> dict:
    """``--partitions P`` from a plain process: P local gloo ranks run :func:`_evaluate`; rank 0
    prints and writes the metrics, which are returned here."""
    import tempfile

    from scalable_equiformer.errors import UserError
    from scalable_equiformer.parallel.launch import spawn_local
    from scalable_equiformer.checkpoint_io import load_checkpoint, resolve_model_checkpoint

    if args.device == "cuda":
        raise UserError(f"--partitions {args.partitions} without a launcher runs {args.partitions} local CPU processes "
                        f"(gloo); for GPUs start the ranks with torchrun --nproc_per_node {args.partitions} "
                        f"tools/evaluate.py ... --partitions {args.partitions}")
    load_checkpoint(resolve_model_checkpoint(args.checkpoint))  # a bad file: one line, before any process starts
    args = argparse.Namespace(**{**vars(args), "device": "cpu"})
    with tempfile.TemporaryDirectory(prefix="se_evaluate_") as tmp:
        spawn_local(_rank_main, args.partitions, args=(args, tmp), threads=None)
        result = json.loads((Path(tmp) / "result.json").read_text())
    if "error" in result:
        raise UserError(result["error"])
    return result["metrics"]


def _rank_main(rank: int, world: int, args, tmp: str) -> None:
    """One local rank of :func:`_evaluate_on_local_ranks` (the gloo group is initialised)."""
    from scalable_equiformer.errors import UserError

    try:
        result = {"metrics": _evaluate(args)}
    except UserError as exc:  # raised alike on every rank (same files, same config)
        result = {"error": str(exc)}
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(result, default=str))


def _evaluate(args) -> dict:
    import warnings

    import numpy as np

    from scalable_equiformer import runtime
    from scalable_equiformer.data import load_dataset, load_splits, make_splits
    from scalable_equiformer.errors import DataError, UserError
    from scalable_equiformer.checkpoint_io import check_atomic_numbers, write_json
    from scalable_equiformer.inference import load_model
    from scalable_equiformer.training.metrics import evaluate, units_header
    from scalable_equiformer.data.dataset import resolve_data_path

    info, device = runtime.init_distributed(False, args.device)
    model, cfg, meta = load_model(args.checkpoint, device=device)
    path = meta["path"]
    root = args.root if args.root is not None else cfg.data.root
    data_arg = args.data
    if Path(data_arg).suffix or "/" in data_arg:
        data_arg = resolve_data_path(data_arg, root)
    dataset = load_dataset(data_arg, root=root)
    if args.json:
        dest = Path(args.json)
    else:
        dest = path.with_name(f"{path.stem}.{Path(str(dataset.path)).stem}.{args.split}.json")
    earlier = _describe_result(dest) if dest.is_file() else None
    if dest.is_file() and earlier is None:  # before evaluating; every rank alike
        raise UserError(f"{dest}: exists and is not an evaluate.py result; give another --json file or move it away")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_atomic_numbers(dataset.z, max_atomic_number=getattr(model, "max_atomic_number", None),
                             elements=meta.get("elements"), where=f"{dataset.path} with {path}",
                             strict=not args.allow_unseen_elements,
                             hint="--allow-unseen-elements evaluates anyway")
    if info.is_main:
        for w in caught:  # one line each, on rank 0
            print(f"warning: {w.message}", file=sys.stderr)

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
    if info.world_size > 1 and not info.initialized:
        raise DataError("several ranks but no process group")
    P = args.partitions
    eval_model, dp_rank, dp_world, dp_group = model, info.rank, info.world_size, None
    if P > 1:
        from scalable_equiformer.parallel import PartitionedModel, make_groups

        if info.world_size % P:
            raise UserError(f"--partitions {P} must divide the number of ranks ({info.world_size})")
        dp_group, part_group = make_groups(info.world_size, P)  # ranks d*P .. d*P+P-1 share a molecule
        eval_model = PartitionedModel(model, group=part_group)
        dp_rank, dp_world = info.rank // P, info.world_size // P
    metrics = evaluate(eval_model, dataset, indices, cfg, device, rank=dp_rank, world=dp_world, group=dp_group,
                       batch_size=args.batch_size or cfg.train.eval_batch_size)
    out = {
        "checkpoint": str(path),
        "epoch": meta["epoch"],
        "partitions": P,
        "data": str(dataset.path),
        "split": args.split,
        "split_source": split_note,
        **metrics,
        "units": "energy MAE meV per molecule; force MAE meV/Å per component; kcal/mol twins",
    }
    if info.is_main:
        print(units_header(str(dest)))
        print(f"{path} (epoch {meta['epoch']}) on {dataset.path} [{split_note}], {metrics['n_frames']} frames"
              + (f", each molecule over {P} partitions" if P > 1 else "") + ":")
        print(f"  energy MAE {metrics['energy_mae_meV']:.4f} meV   "
              f"({metrics['energy_mae_kcal_per_mol']:.5f} kcal/mol)   RMSE {metrics['energy_rmse_meV']:.4f} meV")
        print(f"  force  MAE {metrics['force_mae_meV_per_A']:.4f} meV/Å "
              f"({metrics['force_mae_kcal_per_mol_per_A']:.5f} kcal/mol/Å) "
              f"RMSE {metrics['force_rmse_meV_per_A']:.4f} meV/Å")
        if earlier is not None:
            print(f"warning: {dest} held an earlier result ({earlier}): replaced by this one", file=sys.stderr)
        write_json(dest, out)
        print(f"wrote {dest}")
    runtime.shutdown_distributed()
    return out


def _describe_result(path: Path):
    """What an earlier result file of this tool held, in a few words (for the line that says it is
    replaced); None when the file is not one (then it is not overwritten)."""
    try:
        old = json.loads(path.read_text())
        return (f"{old['checkpoint']} epoch {old['epoch']}, {old['split']} split, force MAE "
                f"{float(old['force_mae_meV_per_A']):.4f} meV/Å")
    except (OSError, ValueError, KeyError, TypeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
