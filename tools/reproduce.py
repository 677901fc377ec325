#!/usr/bin/env python
"""Reproduce the Equiformer tables: train the configs one after another, then write a markdown table
and a bar plot against the published numbers.

    python tools/reproduce.py md17                                   # 8 molecules, Lmax 2
    python tools/reproduce.py md17 --molecules aspirin ethanol --lmax 3
    python tools/reproduce.py md17 --ablation                        # aspirin, 3 attention variants
    python tools/reproduce.py md22 --systems atat dha --data-root data
    python tools/reproduce.py md17 --collect-only                    # table from existing run folders
    python tools/reproduce.py md17 --quick                           # a minute on a CPU: tiny model, shipped aspirin data
    python tools/reproduce.py md17 --dry-run                         # print the commands

Runs land in ``<out>/<suite>/<run>/`` (suite = md17_l2, md17_l3, md17_ablation, md22); the table is
``<out>/<suite>/table.md``, the plot ``bars.png``, the rows ``summary.json``. Runs whose
``results.json`` exists are not trained again (``--rerun`` to force). Units: MD17 in meV and meV/Å;
MD22 in meV/atom and kcal/mol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer import reproduce as rp  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from scalable_equiformer.cli import ArgumentParser, positive_int

    p = ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("suite", choices=["md17", "md22"], help="which table")
    p.add_argument("--molecules", "--systems", nargs="+", metavar="NAME", dest="molecules",
                   help="subset of molecules (md17) or systems (md22: atat atat_cgcg ac_ala3_nhme dha "
                        "stachyose buckyball_catcher nanotube); default all")
    p.add_argument("--lmax", type=int, default=2, choices=[2, 3], help="md17: configs md17_<mol>[_l3] (default 2)")
    p.add_argument("--ablation", action="store_true",
                   help="md17: aspirin with non-linear+MLP, linear+MLP and linear+dot-product attention")
    p.add_argument("--epochs", type=positive_int, help="train.max_epochs for every run")
    p.add_argument("--data-root", help="data.root for every run (where the catalog .npz files are)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", nargs="+", dest="sets",
                   help="config override for every run (repeatable; wins over the tool's own settings)")
    p.add_argument("--launcher", choices=["python", "deepspeed"], default="python",
                   help="python train.py (default) or the deepspeed launcher")
    p.add_argument("--nproc", type=positive_int, help="deepspeed launcher: --num_gpus")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 2 epochs, 100 frames; aspirin reads the GFN2-xTB aspirin frames shipped in "
                        "the package (not MD17 data; default molecule: aspirin)")
    p.add_argument("--quick-data", type=Path,
                   help=f"--quick: the data file for aspirin (default: the shipped {rp.QUICK_DATA.name})")
    p.add_argument("--collect-only", action="store_true", help="no training: table from existing run folders")
    p.add_argument("--rerun", action="store_true", help="train runs again even when results.json exists")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    p.add_argument("--no-plot", action="store_true", help="skip bars.png")
    args = p.parse_args(argv)
    args.sets = [s for group in args.sets for s in group]
    return args


def build_suite(args: argparse.Namespace) -> rp.Suite:
    if args.suite == "md17":
        molecules = args.molecules or ([rp.QUICK_MOLECULE] if args.quick and not args.ablation else None)
        suite = rp.md17_suite(molecules, lmax=args.lmax, ablation=args.ablation)
    else:
        if args.ablation or args.lmax != 2:
            raise UserError("--ablation and --lmax apply to md17 only")
        suite = rp.md22_suite(args.molecules)
    return rp.apply_options(suite, epochs=args.epochs, data_root=args.data_root, quick=args.quick,
                            quick_data=args.quick_data, extra=args.sets)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        suite = build_suite(args)
        out = Path(args.out)
        codes = {}
        if args.dry_run:
            rp.launch(suite, out, launcher=args.launcher, nproc=args.nproc, dry_run=True)
            return 0
        if not args.collect_only:
            codes = rp.launch(suite, out, launcher=args.launcher, nproc=args.nproc, skip_done=not args.rerun)
        rows = rp.collect(suite, out, codes)
        paths = rp.write_report(suite, rows, out, plot=not args.no_plot)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(paths["table"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    failed = [r.key for r in rows if r.status == "failed"]
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
