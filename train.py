#!/usr/bin/env python
"""Train an Equiformer potential.

    python train.py --config demo
    python train.py --config md17_aspirin --set train.max_epochs=10 --set data.root=/data
    torchrun --nproc_per_node 2 train.py --config md17_aspirin
    deepspeed --num_gpus 2 train.py --config md22_atat --set deepspeed.zero_stage=2
    python train.py --resume runs/<run>          # continue an interrupted run

``--config`` takes a path or a name in ``configs/``; ``--set section.key=value`` overrides any key
(repeatable; also ``--set a=1 b=2``). With ``--resume RUN_DIR`` the run's own ``config.yaml`` is used
unless ``--config`` is given; ``--set`` applies on top (e.g. ``train.max_epochs`` to train longer).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else the launcher's
    ``RANK`` (torchrun, deepspeed) or ``LOCAL_RANK``; 0 without a launcher."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # a broken process group: fall back on the launcher's variables
        pass
    for name in ("RANK", "LOCAL_RANK"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def _report(exc) -> bool:
    """Whether this rank prints ``exc``. Rank 0 always; the other ranks only when the error may
    differ between ranks: a ConfigError is the same on every rank (same config, same checks), unless
    the trainer found it on some ranks only (``rank_specific``)."""
    from scalable_equiformer.errors import ConfigError

    return _rank() == 0 or not isinstance(exc, ConfigError) or getattr(exc, "rank_specific", False)


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, add_set_argument, nonnegative_int

    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="config file, or a name in configs/ (e.g. demo, md17_aspirin)")
    add_set_argument(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    # the DeepSpeed launcher passes --local_rank
    p.add_argument("--local_rank", "--local-rank", type=nonnegative_int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    overrides = args.overrides
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        os.environ.setdefault("SE_DEEPSPEED_LAUNCHER", "1")

    from scalable_equiformer.config import load_config
    from scalable_equiformer.errors import UserError

    try:
        if args.config is None and args.resume is None:
            p.error("give --config (or --resume RUN_DIR)")
        source = args.config
        if source is None:
            source = Path(args.resume) / "config.yaml"
            if not source.is_file():
                from scalable_equiformer.errors import CheckpointError

                raise CheckpointError(f"{args.resume}: no config.yaml in it: not a run folder")
        config = load_config(source, overrides)
        from scalable_equiformer.training import run

        run(config, resume=args.resume)
    except UserError as exc:  # every rank exits with 2; see _report for which ones print
        if _report(exc):
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (runtime.Terminated); a launcher's reaches every rank
        # the trainer logs where it stopped once it has a run folder
        if _rank() == 0 and not getattr(exc, "logged", False):
            name = getattr(exc, "signal_name", "SIGINT (Ctrl-C)")
            if args.resume is not None:
                print(f"stopped by {name} during set-up; {args.resume} is as it was: continue with: "
                      f"python train.py --resume {args.resume}", file=sys.stderr)
            else:
                print(f"stopped by {name} before the run folder was made: nothing to resume, start it again",
                      file=sys.stderr)
        return 143 if getattr(exc, "signal_name", "") == "SIGTERM" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
