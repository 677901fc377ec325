#!/usr/bin/env python
"""Markdown tables of run.sh's figures, this project against the original, per molecule.

    python benchmarks/original/compare.py original.json this_aspirin.json this_cluster60.json ...   # memory
    python benchmarks/original/compare.py --speed speed/r*.json [--json speed.json]                  # speed

Speed: the files of ``step.py --speed`` and ``this_step.py`` (one per process); per molecule and
implementation, the median over every timed step of every round (process CPU time: less hit by
the other processes of a shared machine than wall time, which is kept in the JSON), the training
and the inference step, and each one's ratio original / this ("2.00x": twice as fast as the
original). A "before, levers off" column (run.sh's ``BEFORE``: another checkout, measured in the
same run) appears when its files are given.
"""
import json
import statistics
import sys

MiB = 2**20
IMPLS = ("original", "before, levers off", "this, levers off", "this, checkpointing=forces")


def memory(argv) -> int:
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


def speed_summary(paths) -> dict:
    """{molecule: {"atoms", "edges", impl: {mode: {"median_cpu_s", "median_wall_s", "cpu_s", "wall_s"}}}}."""
    out: dict = {}
    for path in paths:
        doc = json.loads(open(path).read())
        impl = doc["implementation"]
        for r in doc["runs"]:
            m = out.setdefault(r["molecule"], {"atoms": r["atoms"], "edges": r["edges"]})
            if (m["atoms"], m["edges"]) != (r["atoms"], r["edges"]):
                raise ValueError(f"{path}: {r['molecule']} has {r['atoms']} atoms and {r['edges']} edges, "
                                 f"elsewhere {m['atoms']} and {m['edges']}")
            for mode in ("train", "infer"):
                d = m.setdefault(impl, {}).setdefault(mode, {"cpu_s": [], "wall_s": []})
                d["cpu_s"] += r[f"{mode}_cpu_s"]
                d["wall_s"] += r[f"{mode}_wall_s"]
    for m in out.values():
        for impl in IMPLS:
            for d in m.get(impl, {}).values():
                d["median_cpu_s"] = statistics.median(d["cpu_s"])
                d["median_wall_s"] = statistics.median(d["wall_s"])
    return out


def speed(paths, json_out=None) -> int:
    s = speed_summary(paths)
    names = {"train": "training step", "infer": "inference step"}
    for mode in ("train", "infer"):
        print(f"\n{names[mode]}, median process CPU seconds (original / this: how many times faster than the original)\n")
        shown = [i for i in IMPLS[1:] if any(i in m for m in s.values())]
        print("| molecule | atoms | edges | original | " + " | ".join(i.replace("checkpointing=forces", "`checkpointing=forces`")
                                                             for i in shown) + " | samples |")
        print("|---|---|---|---|" + "---|" * len(shown) + "---|")
        for name, m in sorted(s.items(), key=lambda kv: kv[1]["atoms"]):
            if "original" not in m:
                print(f"no original run of {name}", file=sys.stderr)
                return 1
            ref = m["original"][mode]["median_cpu_s"]
            cells = [f"{ref:.3f} s"]
            for impl in shown:
                t = m.get(impl, {}).get(mode)
                cells.append("-" if t is None else f"{t['median_cpu_s']:.3f} s ({ref / t['median_cpu_s']:.2f}x)")
            n = "/".join(str(len(m[i][mode]["cpu_s"])) for i in IMPLS if i in m)
            print(f"| {name} | {m['atoms']} | {m['edges']} | " + " | ".join(cells) + f" | {n} |")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"unit": "s", "statistic": "median over all timed steps of all rounds", "molecules": s}, f, indent=1)
    return 0


def main(argv) -> int:
    if argv and argv[0] == "--speed":
        rest = argv[1:]
        json_out = None
        if "--json" in rest:
            i = rest.index("--json")
            json_out, rest = rest[i + 1], rest[:i] + rest[i + 2:]
        return speed(rest, json_out)
    return memory(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
