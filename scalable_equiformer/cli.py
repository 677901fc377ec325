"""Command-line plumbing shared by ``train.py`` and ``tools/*``: a parser whose errors are one
line, and argument types that check numbers, sizes and output paths when the command line is
parsed, before any data is read or anything is measured.

>>> p = ArgumentParser(prog="tool")
>>> _ = p.add_argument("--batch-size", type=positive_int)
>>> p.parse_args(["--batch-size", "8"]).batch_size
8
>>> positive_int("0")
Traceback (most recent call last):
argparse.ArgumentTypeError: must be an integer >= 1, not '0'
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Optional


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a bad command line as one line on stderr,
    ``error: <prog>: <problem> (see --help)``, and exits with status 2 (argparse's status)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        message = " ".join(str(message).split())
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _int_type(low: Optional[int], high: Optional[int] = None) -> Callable[[str], int]:
    if high is not None:
        what = f"an integer from {low} to {high}"
    else:
        what = f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def int_range(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (``high`` None = no upper bound)."""
    return _int_type(low, high)


positive_int = _int_type(1)
nonnegative_int = _int_type(0)


def _float_type(what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a finite number for which ``ok(value)`` holds; else "must be <what>"."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


positive_float = _float_type("a number > 0", lambda v: v > 0)
finite_float = _float_type("a finite number", lambda v: True)
nonnegative_float = _float_type("a number >= 0", lambda v: v >= 0)


def positive_int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1, e.g. ``30,60,120``."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, not {text!r}")
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1; {x!r} in {text!r} is not")
        out.append(v)
    return out


def tile_spec(text: str) -> str:
    """An argparse type: ``AxBxC`` copies along x, y, z (each >= 1), e.g. ``3x3x2``; returned as given."""
    try:
        reps = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        reps = []
    if len(reps) != 3 or any(r < 1 for r in reps):
        raise argparse.ArgumentTypeError(f"expected AxBxC with integers >= 1 (e.g. 3x3x2), not {text!r}")
    return str(text)


def memory_size(text: str) -> int:
    """An argparse type: a memory size such as ``40GB``, ``80GiB``, ``512MB`` -> bytes (GB = GiB);
    unparsable, non-finite, zero or sub-byte sizes are refused (``planner.parse_bytes``'s rules)."""
    from .errors import UserError
    from .profiling.planner import parse_bytes

    try:
        return parse_bytes(text, flag="")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_set_argument(parser: argparse.ArgumentParser, dest: str = "overrides",
                     help: str = "override a config key, e.g. --set train.max_epochs=10 data.root=data (repeatable)"):
    """``--set KEY=VALUE [KEY=VALUE ...]``, repeatable, into one flat list ``args.<dest>`` (in the
    order given): the one definition of ``train.py``'s and every tool's ``--set``."""
    return parser.add_argument("--set", dest=dest, action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                               help=help)


def output_file(text: str) -> Path:
    """An argparse type: a file to write; an existing folder is refused (say a file name in it)."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {p / 'out.json'}")
    return p


def exit_on_user_error(fn: Callable[[], int]) -> int:
    """Run ``fn``; a :class:`~scalable_equiformer.errors.UserError` becomes ``error: ...`` on
    stderr and exit status 2."""
    from .errors import UserError

    try:
        return fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["ArgumentParser", "int_range", "positive_int", "nonnegative_int", "positive_float", "finite_float",
           "nonnegative_float", "positive_int_list", "tile_spec", "memory_size", "add_set_argument", "output_file",
           "exit_on_user_error"]
