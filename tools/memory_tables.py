#!/usr/bin/env python
"""Markdown tables of ``tools/memory_profile.py`` JSON files (what benchmarks/memory.md shows).

    python tools/memory_tables.py benchmarks/memory_atat_b1.json [more.json ...]

One table per file: per lever set, the peak (per rank with graph partitions), activations per
edge that the rank computes, the step's CPU time and its ratio to the levers-off step of the same
molecule and batch, the peak cut against levers off, and the estimate with measured/estimated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30


def table(doc: dict) -> str:
    from scalable_equiformer.profiling.estimate import Levers

    rows = ["| levers | atoms | edges (per rank) | batch | peak GiB | activations per edge | step CPU s | time x | peak cut | estimate GiB | meas/est |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in doc["runs"]:
        if not r.get("oom") and Levers(**r["levers"]).label() == "none":
            base[(r["atoms"], r["batch"])] = r
    for r in doc["runs"]:
        label = Levers(**r["levers"]).label()
        if r.get("oom"):
            rows.append(f"| {label} | {r['atoms']} | {r['edges']} | {r['batch']} | out of memory | | | | | | |")
            continue
        b = base.get((r["atoms"], r["batch"]))
        cut = f"{b['peak_bytes'] / r['peak_bytes']:.2f}x" if b else "-"
        tx = f"{r['time_ratio']:.2f}" if r.get("time_ratio") else "-"
        edges = f"{r['edges']}" + (f" ({r['rank_edges']})" if r["levers"].get("graph_partitions", 1) > 1 else "")
        rows.append(f"| {'none (levers off)' if label == 'none' else label} | {r['atoms']} | {edges} | {r['batch']} | "
                    f"{r['peak_bytes'] / GiB:.3f} | {r['bytes_per_edge'] / 2**20:.3f} MiB | {r['step_cpu_seconds']:.1f} | {tx} | "
                    f"{cut} | {r['estimated_peak_bytes'] / GiB:.3f} | {r['ratio_measured_estimated']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: {p}: cannot read a memory_profile JSON ({exc})", file=sys.stderr)
            return 2
        print(f"`{Path(p).name}` ({doc.get('device', '?')})\n")
        print(table(doc))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
