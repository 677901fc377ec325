#!/usr/bin/env python
r"""Markdown tables of ``tools/memory_profile.py`` JSON files (benchmarks/memory.md, memory_cuda.md).

    python tools/memory_tables.py benchmarks/memory_atat_b1.json [more.json ...]
    python tools/memory_tables.py OUT/memory_profile.json --report [--summary OUT/summary.json] \
        > benchmarks/memory_cuda.md
    python tools/memory_tables.py OUT/memory_profile.json \
        --cuda-factors scalable_equiformer/profiling/time_factors_cuda.json

One table per file: per lever set, the peak (per rank with graph partitions), activations per
edge that the rank computes, the step time (CPU runs: process CPU time; CUDA runs: synchronised
wall time) and its ratio to the levers-off step of the same molecule and batch, the peak cut
against levers off, and the estimate with measured/estimated. Lever sets that ran out of memory,
failed or were not measured in the time budget are rows that say so.

``--report`` writes a whole page for one JSON (what benchmarks/gpu/run.sh measures): the table,
whether the largest molecule fits in the device's memory per lever set (and the plan), the time
factors measured for the planner, and with ``--summary`` (run.sh's summary.json) the equivalence
tests and the training throughput. ``--cuda-factors FILE`` writes the time factors of a CUDA JSON
where the planner reads them (``planner.CUDA_FACTORS_FILE``); a JSON measured on the CPU is
refused: CPU ratios are not CUDA figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30


def _failed(r: dict) -> str:
    if r.get("oom"):
        return "out of memory"
    if r.get("not_measured"):
        return "not measured (time budget)"
    if r.get("error"):
        return "failed: " + str(r["error"]).replace("|", "/")[:80]
    return ""


def _on_cuda(doc: dict) -> bool:
    return str(doc.get("device", "")).startswith("cuda")


def table(doc: dict) -> str:
    from scalable_equiformer.memory import Levers

    cuda = _on_cuda(doc)
    time_key, time_head = ("step_seconds", "step s (GPU)") if cuda else ("step_cpu_seconds", "step CPU s")
    rows = [f"| levers | atoms | edges (per rank) | batch | peak GiB | activations per edge | {time_head} | time x "
            "| peak cut | estimate GiB | meas/est |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in doc["runs"]:
        if not _failed(r) and Levers(**r["levers"]).label() == "none":
            base[(r.get("data"), r["atoms"], r["batch"])] = r
    for r in doc["runs"]:
        label = Levers(**r["levers"]).label()
        name = "none (levers off)" if label == "none" else label
        what = _failed(r)
        if what:
            est = f"{r['estimated_peak_bytes'] / GiB:.3f}" if r.get("estimated_peak_bytes") else ""
            rows.append(f"| {name} | {r['atoms']} | {r['edges']} | {r['batch']} | {what} | | | | | {est} | |")
            continue
        b = base.get((r.get("data"), r["atoms"], r["batch"]))
        cut = f"{b['peak_bytes'] / r['peak_bytes']:.2f}x" if b else "-"
        tx = f"{r['time_ratio']:.2f}" if r.get("time_ratio") else "-"
        t = r.get(time_key)
        tt = "-" if t is None else (f"{t:.3f}" if cuda else f"{t:.1f}")
        edges = f"{r['edges']}" + (f" ({r['rank_edges']})" if r["levers"].get("graph_partitions", 1) > 1 else "")
        rows.append(f"| {name} | {r['atoms']} | {edges} | {r['batch']} | "
                    f"{r['peak_bytes'] / GiB:.3f} | {r['bytes_per_edge'] / 2**20:.3f} MiB | {tt} | {tx} | "
                    f"{cut} | {r['estimated_peak_bytes'] / GiB:.3f} | {r['ratio_measured_estimated']:.2f} |")
    return "\n".join(rows)


def fit_table(doc: dict) -> str:
    """Per lever set, whether the largest molecule's step fits in the device's memory."""
    from scalable_equiformer.memory import Levers

    runs = doc["runs"]
    if not runs:
        return "(no runs)"
    top = max(runs, key=lambda r: (r["atoms"] * r["batch"], r["edges"]))
    mine = [r for r in runs if (r["atoms"], r["batch"], r.get("data")) == (top["atoms"], top["batch"], top.get("data"))]
    total = next((r.get("device_total_memory_bytes") for r in runs if r.get("device_total_memory_bytes")), None)
    where = f"{total / GiB:.1f} GiB" if total else "the device's memory (unknown)"
    rows = [f"{top['atoms']} atoms, batch {top['batch']} ({top['edges']} edges) on {doc.get('device', '?')}, "
            f"{where}:", "",
            "| levers | measured peak GiB | fits | estimate GiB |", "|---|---|---|---|"]
    for r in mine:
        label = Levers(**r["levers"]).label()
        est = f"{r['estimated_peak_bytes'] / GiB:.2f}" if r.get("estimated_peak_bytes") else "-"
        if r.get("oom"):
            rows.append(f"| {label} | out of memory | no | {est} |")
        elif _failed(r):
            rows.append(f"| {label} | {_failed(r)} | unknown | {est} |")
        else:
            fits = "-" if not total else ("yes" if r["peak_bytes"] <= total else "no")
            share = f" ({100 * r['peak_bytes'] / total:.0f} %)" if total else ""
            rows.append(f"| {label} | {r['peak_bytes'] / GiB:.2f}{share} | {fits} | {est} |")
    plan = doc.get("plan")
    if plan:
        best = plan.get("best")
        rows += ["", f"Plan for {plan.get('gpus', 1)} GPU(s) of {plan['budget_bytes'] / GiB:.1f} GiB "
                     f"({plan.get('atoms', '?')} atoms, batch {plan.get('batch', '?')}): "
                 + (f"`{' '.join('--set ' + o for o in plan['overrides'])}` (estimated peak "
                    f"{best['peak_bytes'] / GiB:.2f} GiB, time x{best['relative_time']:.2f})" if best
                    else "nothing fits")
                 + (f"; time factors: {plan['time_factors']['source']}" if plan.get("time_factors") else "")]
    return "\n".join(rows)


def factors_table(doc: dict, name: str = "") -> str:
    from scalable_equiformer.profiling.planner import factors_from_profile

    f = factors_from_profile(doc, name)
    if not f["factors"]:
        return "(no lever set with a levers-off base was measured)"
    rows = [f"{f['source']}", "", "| factor | median | per molecule |", "|---|---|---|"]
    for k, vals in f["samples"].items():
        med = f["factors"][k.split(".")[0]][k.split(".")[1]] if "." in k else f["factors"][k]
        per_molecule = ", ".join(f"{v['atoms']}x{v['batch']}: {v['value']:.2f}" for v in vals)
        rows.append(f"| {k} | {med:.3f} | " + per_molecule + " |")
    return "\n".join(rows)


def summary_sections(summary: dict) -> str:
    """run.sh's equivalence tests and training runs, as markdown."""
    out = []
    tests = summary.get("phases", {}).get("tests", {})
    if tests:
        counts = ", ".join(f"{k} {v}" for k, v in (tests.get("counts") or {}).items()) or "no test results"
        out += ["## Equivalence tests on the device", "",
                f"`{tests.get('command', '')}`: {tests.get('status')}, {counts}."
                + (f" {tests['error'].splitlines()[0]}" if tests.get("error") else ""), ""]
        for t in tests.get("failures", []):
            out.append(f"- {t['name']}: {t['message'][:200]}")
        if tests.get("failures"):
            out.append("")
    train = summary.get("phases", {}).get("train", {})
    if train.get("runs"):
        out += ["## Training throughput through train.py", "",
                train.get("data_note", ""), "",
                "| run | engine | precision | batch | steps timed | molecules/s | peak GiB | estimate GiB | meas/est "
                "| status |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in train["runs"]:
            mps = f"{r['molecules_per_s']:.1f}" if r.get("molecules_per_s") else "-"
            peak = f"{r['peak_memory_bytes'] / GiB:.2f}" if r.get("peak_memory_bytes") else "-"
            est = f"{r['estimated_peak_bytes'] / GiB:.2f}" if r.get("estimated_peak_bytes") else "-"
            ratio = (f"{r['peak_memory_bytes'] / r['estimated_peak_bytes']:.2f}"
                     if r.get("peak_memory_bytes") and r.get("estimated_peak_bytes") else "-")
            out.append(f"| {r['name']} | {r.get('engine', '-')} | {r.get('precision', '-')} | {r.get('batch', '-')} | "
                       f"{r.get('timed_steps', '-')} | {mps} | {peak} | {est} | {ratio} | {r.get('status')} |")
        out.append("")
        for r in train["runs"]:
            if r.get("error"):
                out.append(f"- {r['name']}: {r['error'].splitlines()[0][:300]}")
        if train.get("estimates") not in (None, "ok"):
            out.append(f"- estimates: {str(train['estimates']).splitlines()[0][:300]}")
        out.append("")
    return "\n".join(out)


def report(doc: dict, name: str, summary: dict | None = None) -> str:
    on = doc.get("device", "?")
    head = [f"# Memory and time of one training step on {on}", "",
            f"Made by `tools/memory_tables.py {name} --report` from the JSON of `benchmarks/gpu/run.sh`"
            + (" (CUDA: `max_memory_allocated` from a reset per measurement, minus what was allocated before "
               "the model was built; step time = synchronised wall time, median of the timed steps)."
               if _on_cuda(doc) else " (CPU run: figures say nothing about a GPU)."),
            f"Model: {doc.get('config', '?')}, {doc.get('num_params', 0) / 1e6:.3f} M parameters, "
            f"{doc.get('num_blocks', '?')} blocks; "
            f"measured in {'one process' if doc.get('one_process') else 'a process each'}.",
            ""]
    parts = head + ["## Per lever set and molecule", "", table(doc), "",
                    "## Does the largest molecule fit?", "", fit_table(doc), "",
                    "## Time factors for the planner", "", factors_table(doc, name), ""]
    if summary:
        parts.append(summary_sections(summary))
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("json", nargs="+", help="tools/memory_profile.py JSON file(s)")
    p.add_argument("--report", action="store_true", help="a whole markdown page for one JSON (memory_cuda.md)")
    p.add_argument("--summary", help="benchmarks/gpu/run.sh summary.json: adds tests and training to --report")
    p.add_argument("--cuda-factors", metavar="FILE", help="write the planner's CUDA time factors of one CUDA JSON here")
    args = p.parse_args(argv)
    docs = []
    for path in args.json:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: cannot read a memory_profile JSON ({exc})", file=sys.stderr)
            return 2
    if (args.report or args.cuda_factors) and len(docs) != 1:
        print("error: --report and --cuda-factors take one JSON", file=sys.stderr)
        return 2
    if args.cuda_factors:
        from scalable_equiformer.profiling.planner import factors_from_profile

        doc, name = docs[0], Path(args.json[0]).name
        if not _on_cuda(doc):
            print(f"error: {args.json[0]}: measured on {doc.get('device', '?')}, not CUDA: no CUDA time factors in it "
                  "(the planner keeps its assumed ones)", file=sys.stderr)
            return 2
        f = factors_from_profile(doc, name)
        if not f["factors"]:
            print(f"error: {args.json[0]}: no lever set with a levers-off base was measured", file=sys.stderr)
            return 2
        Path(args.cuda_factors).write_text(json.dumps(f, indent=1) + "\n")
        print(f"wrote {args.cuda_factors}: {f['source']}")
        return 0
    if args.report:
        summary = json.loads(Path(args.summary).read_text()) if args.summary else None
        print(report(docs[0], Path(args.json[0]).name, summary))
        return 0
    for path, doc in zip(args.json, docs):
        print(f"`{Path(path).name}` ({doc.get('device', '?')})\n")
        print(table(doc))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
