#!/usr/bin/env python
"""Markdown table of run.sh's figures: original vs this project, levers off, per molecule.

    python benchmarks/original/compare.py original.json this_aspirin.json this_cluster60.json ...
"""
import json
import sys

MiB = 2**20


def main(argv) -> int:
    orig = {(r["atoms"], r["edges"]): r for r in json.loads(open(argv[0]).read())["runs"]}
    print("| molecule | atoms | edges | original MiB | this MiB | this / original | original CPU s | this CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    runs = sorted((r for path in argv[1:] for r in json.loads(open(path).read())["runs"]), key=lambda r: r["atoms"])
    for r in runs:
        o = orig.get((r["atoms"], r["edges"]))
        if o is None:
            print(f"no original run with {r['atoms']} atoms and {r['edges']} edges", file=sys.stderr)
            return 1
        this, ref = r["activation_bytes"], o["activation_bytes"]
        print(f"| {o['molecule']} | {r['atoms']} | {r['edges']} | {ref / MiB:.1f} | {this / MiB:.1f} | {this / ref:.3f} | "
              f"{o['step_cpu_seconds']:.2f} | {r['step_cpu_seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
