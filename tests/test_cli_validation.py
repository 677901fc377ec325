"""Command lines (issue 12): every numeric argument of every tool is checked when the command line
is parsed, and bad input gives one line ``error: ...`` naming the argument or file, exit status 2,
no traceback."""

from __future__ import annotations

import argparse
import json
import importlib.util
import sys
from pathlib import Path

import pytest

from test_train_common import DEMO_DATA, REPO, tiny_config, train_in_process

#: every command-line entry point of the product: (name, path)
TOOLS = {
    "train": REPO / "train.py",
    "evaluate": REPO / "tools" / "evaluate.py",
    "memory_profile": REPO / "tools" / "memory_profile.py",
    "reproduce": REPO / "tools" / "reproduce.py",
    "bench_model": REPO / "tools" / "bench_model.py",
    "bench_partition": REPO / "tools" / "bench_partition.py",
    "download": REPO / "tools" / "download.py",
    "memory_tables": REPO / "tools" / "memory_tables.py",
    "import_original": REPO / "tools" / "import_original.py",
    "check_partitions": REPO / "tools" / "check_partitions.py",
}


def _module(name):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", TOOLS[name])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _main(name, argv, capsys):
    """(exit status, stdout, stderr) of ``main(argv)`` of a tool, in this process."""
    mod = _module(name)
    capsys.readouterr()
    argv0, sys.argv[0] = sys.argv[0], str(TOOLS[name])  # the program name in messages
    try:
        rc = mod.main(argv)
    except SystemExit as exc:
        rc = exc.code
    finally:
        sys.argv[0] = argv0
    out = capsys.readouterr()
    return rc, out.out, out.err


def _parsers(name, monkeypatch):
    """The argparse parsers a tool builds (captured at parse_args; nothing runs)."""
    seen = []

    class Stop(Exception):
        pass

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [str(TOOLS[name])])
    mod = _module(name)
    if hasattr(mod, "parse_args") and name == "reproduce":
        with pytest.raises(Stop):
            mod.parse_args([])
    elif name != "memory_tables":
        with pytest.raises(Stop):
            mod.main([])
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_no_numeric_argument_is_left_unchecked(name, monkeypatch):
    """Plain ``type=int`` / ``type=float`` accepts -1, 0, nan: every numeric argument must use a
    checking type from scalable_equiformer.cli (or fixed choices)."""
    parsers = _parsers(name, monkeypatch)
    if name == "memory_tables":  # takes file names only
        assert parsers == []
        return
    assert parsers, name
    unchecked = [a.option_strings or a.dest for p in parsers for a in p._actions
                 if a.type in (int, float) and not a.choices]
    assert unchecked == [], f"{name}: {unchecked}"


BAD = [
    ("evaluate", ["ckpt.pt", "--data", "x.npz", "--max-frames", "0"], "--max-frames"),
    ("evaluate", ["ckpt.pt", "--data", "x.npz", "--partitions", "0"], "--partitions"),
    ("memory_profile", ["--atoms", "0"], "--atoms"),
    ("memory_profile", ["--batch-size", "-2"], "--batch-size"),
    ("memory_profile", ["--threads", "0"], "--threads"),
    ("memory_profile", ["--timing-steps", "-1"], "--timing-steps"),
    ("memory_profile", ["--zero-stage", "4"], "--zero-stage"),
    ("memory_profile", ["--ranks", "0"], "--ranks"),
    ("memory_profile", ["--gpus", "0"], "--gpus"),
    ("memory_profile", ["--timeout", "nan"], "--timeout"),
    ("memory_profile", ["--sweep-atoms", "30,0"], "--sweep-atoms"),
    ("memory_profile", ["--gpu-memory", "40XB", "--plan"], "--gpu-memory"),
    ("memory_profile", ["--gpu-memory", "-4GB", "--plan"], "--gpu-memory"),
    ("memory_profile", ["--gpu-memory=1e400GB", "--plan"], "--gpu-memory"),  # was an OverflowError traceback
    ("memory_profile", ["--gpu-memory=1e-30GB", "--plan"], "--gpu-memory"),  # was 0 bytes, taken as "not given"
    ("memory_profile", ["--gpu-memory=1e300GB", "--plan"], "--gpu-memory"),  # finite, but not as a float of bytes
    ("memory_profile", ["--gpu-memory=1.2.3GB", "--plan"], "--gpu-memory"),  # was a ValueError traceback
    ("memory_profile", ["--gpu-memory=0GB", "--plan"], "--gpu-memory"),
    ("reproduce", ["md17", "--epochs", "0"], "--epochs"),
    ("reproduce", ["md17", "--nproc", "-1"], "--nproc"),
    ("bench_model", ["--repeats", "0"], "--repeats"),
    ("bench_model", ["--batch-size", "0"], "--batch-size"),
    ("bench_model", ["--threads", "-1"], "--threads"),
    ("bench_model", ["--compile", "compare", "--size-probe", "0"], "--size-probe"),
    ("bench_partition", ["--partitions", "2", "0"], "--partitions"),
    ("bench_partition", ["--repeats", "0"], "--repeats"),
    ("bench_partition", ["--cutoff", "0"], "--cutoff"),
    ("bench_partition", ["--gap", "-1"], "--gap"),
    ("bench_partition", ["--train-tile", "3x0x2"], "--train-tile"),
    ("check_partitions", ["--data", "x.npz", "-P", "0"], "--partitions"),
    ("check_partitions", ["--data", "x.npz", "-P", "2", "--frames", "0"], "--frames"),
    ("check_partitions", ["--data", "x.npz", "-P", "2", "--tolerance", "-1e-9"], "--tolerance"),
    ("train", ["--config", "demo", "--local_rank", "-1"], "--local_rank"),
    ("import_original", ["c.pth.tar", "--config", "md17_aspirin", "--out", "m.pt", "--energy-mean", "nan",
                         "--energy-std", "1"], "--energy-mean"),
    ("import_original", ["c.pth.tar", "--config", "md17_aspirin", "--out", "m.pt", "--energy-mean", "1",
                         "--energy-std", "0"], "--energy-std"),
    ("import_original", ["c.pth.tar", "--config", "md17_aspirin", "--out", "m.pt", "--energy-mean", "1",
                         "--energy-std", "1", "--num-atoms", "0"], "--num-atoms"),
]


@pytest.mark.parametrize("name,argv,arg", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_bad_numbers_are_refused_when_parsing(name, argv, arg, capsys):
    rc, out, err = _main(name, argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and f"argument {arg}" in lines[0] and "Traceback" not in err
    assert out == ""  # refused before anything ran


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_in_process(tiny_config(root, "logging.tensorboard=false", "logging.plot=false", epochs=1, test=8))
    return root / "run" / "best.pt"


@pytest.mark.parametrize("value", ["-1", "0"])
def test_evaluate_batch_size_must_be_positive(checkpoint, value, capsys):
    """Today: -1 evaluated 0 frames and reported MAE 0.0000 (exit 0); 0 used the default."""
    rc, out, err = _main("evaluate", [str(checkpoint), "--data", str(DEMO_DATA), "--batch-size", value], capsys)
    assert rc == 2 and out == "", out
    assert err.strip() == (f"error: evaluate.py: argument --batch-size: must be an integer >= 1, not '{value}' "
                           "(see --help)")


def test_evaluate_json_naming_a_folder(checkpoint, tmp_path, capsys):
    rc, out, err = _main("evaluate", [str(checkpoint), "--data", str(DEMO_DATA), "--json", str(tmp_path)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and out == ""
    assert f"argument --json: {tmp_path} is a folder; give a file name" in lines[0]


def test_memory_profile_gpu_memory_below_the_runtime_reserve(tmp_path, capsys):
    rc, out, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--plan", "--gpu-memory", "256MB",
                                            "--json", str(tmp_path / "p.json")], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --gpu-memory 0.25 GiB: below what the CUDA runtime reserves (0.5 GiB")
    assert "nothing can fit" in lines[0]
    assert out == "" and not (tmp_path / "p.json").exists()  # refused before estimating or measuring


@pytest.mark.parametrize("value,problem", [
    ("1e400GB", "not a finite size; expected one such as 40GB or 80GiB"),
    ("1e-30GB", "less than one byte; expected a size such as 40GB or 80GiB"),
    ("1.2.3GB", "expected a size such as 40GB or 80GiB"),
    ("0GB", "must be > 0"),
])
def test_memory_size_says_what_is_wrong(value, problem, capsys):
    rc, out, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--plan", f"--gpu-memory={value}"],
                         capsys)
    assert rc == 2 and out == ""
    assert err.strip() == f"error: memory_profile.py: argument --gpu-memory: {value!r}: {problem} (see --help)"


def test_memory_profile_json_naming_a_folder(tmp_path, capsys):
    rc, out, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--json", str(tmp_path)], capsys)
    assert rc == 2 and out == "" and "argument --json" in err and "is a folder" in err


def test_binary_file_as_config(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    for name, argv in (("train", ["--config", str(binary)]),
                       ("memory_profile", ["--config", str(binary), "--estimate-only"])):
        rc, out, err = _main(name, argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (name, err)
        assert lines[0] == (f"error: {binary}: not a text file (binary data); --config takes a YAML file or a name "
                            "in configs/"), name
    npz = DEMO_DATA  # a data file passed as the config by mistake
    rc, _, err = _main("train", ["--config", str(npz)], capsys)
    assert rc == 2 and "not a text file" in err and len(err.strip().splitlines()) == 1


def test_memory_profile_plan_across_nodes(capsys):
    """--gpus 8 --gpus-per-node 4: graph partitions within a node (no P=8) and the multi-node launch lines."""
    rc, out, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--plan", "--gpu-memory", "40GB",
                                            "--gpus", "8", "--gpus-per-node", "4"], capsys)
    assert rc in (0, None), err
    assert "plan for 8 GPU(s) on 2 nodes of 4" in out and "P=8" not in out
    assert "launch: torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 4 --rdzv_backend c10d" in out
    assert "launch: deepspeed --hostfile hostfile" in out and "launch: deepspeed --no_ssh --node_rank $NODE_RANK" in out
    rc, out, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--plan", "--gpu-memory", "40GB",
                                            "--gpus", "8", "--gpus-per-node", "3"], capsys)
    assert rc == 2 and err.strip().splitlines() == ["error: --gpus-per-node 3 must divide --gpus 8"], err


@pytest.mark.parametrize("text,problem", [
    ("data: {path: x.npz}\ntrain: {max_epochs: 1}\ntrain: {max_epochs: 1500}\n",
     "line 3: key 'train' appears twice (first at line 2); YAML would keep only the last: remove or merge one"),
    ("data: {path: x.npz, seed: -1}\n",
     "data.seed: must be an integer from 0 to 2**64-1 (a random-number seed), not -1"),
])
def test_train_refuses_duplicate_keys_and_negative_seeds_in_one_line(tmp_path, text, problem, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, out, err = _main("train", ["--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'runs'}"], capsys)
    assert rc == 2 and out == ""
    assert err.strip() == f"error: {cfg}: {problem}"
    assert not (tmp_path / "runs").exists()


#: the arguments each tool with --set requires besides it
SET_TOOLS = {"train": [], "memory_profile": [], "reproduce": ["md17"],
             "check_partitions": ["--data", "x.npz", "-P", "2"],
             "import_original": ["c.pth.tar", "--config", "md17_aspirin", "--out", "m.pt"]}


@pytest.mark.parametrize("name", sorted(SET_TOOLS))
def test_set_takes_several_keys_per_flag_in_every_tool(name, monkeypatch):
    """``train.py --set a=1 b=2`` took several keys, memory_profile one per flag (the second was an
    'unrecognized argument'), check_partitions kept only the last --set: one definition now
    (cli.add_set_argument), every key kept in order."""
    parsers = [p for p in _parsers(name, monkeypatch) if any("--set" in a.option_strings for a in p._actions)]
    assert len(parsers) == 1, name
    (p,) = parsers
    dest = next(a.dest for a in p._actions if "--set" in a.option_strings)
    ns = p.parse_args(SET_TOOLS[name] + ["--set", "train.batch_size=2", "model.cutoff=4.0",
                                         "--set", "memory.precision=bf16"])
    assert getattr(ns, dest) == ["train.batch_size=2", "model.cutoff=4.0", "memory.precision=bf16"]


def test_memory_profile_applies_every_key_of_one_set(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc, _, err = _main("memory_profile", ["--config", "demo", "--estimate-only", "--set", "train.batch_size=2",
                                          "model.cutoff=4.0", "--set", "memory.precision=bf16", "--json", str(out)],
                     capsys)
    assert rc in (0, None), err
    data = json.loads(out.read_text())
    assert data["batch"] == 2 and data["model"]["cutoff"] == 4.0 and data["runs"][0]["lever_set"] == "bf16"


@pytest.mark.parametrize("partitions", [["2"], ["1", "2"]])
def test_bench_partition_prints_no_stray_json_and_writes_under_runs(partitions, tmp_path, monkeypatch, capsys):
    """``--skip-infer`` without P=1 printed a bare ``{}`` (the empty summary), and the report went to
    bench_partition.json in the current folder (the repository root, not ignored): now summary lines
    (or one line saying why there are none) and runs/bench_partition.json by default."""
    mod = _module("bench_partition")

    def fake_run(model, tasks, warmup, P, repeats, checkpointing="none"):  # the P gloo processes, faked
        return [{t["name"]: {"seconds": 1.0 / P, "peak_bytes": 1000 // P} for t in tasks} for _ in range(P)]

    monkeypatch.setattr(mod, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = mod.main(["--skip-infer", "--train-tile", "1x1x1", "--partitions", *partitions])
    out = capsys.readouterr().out
    assert rc == 0
    assert not any(line.strip() in ("{}", "{", "}") for line in out.splitlines()), out
    report = json.loads((tmp_path / "runs" / "bench_partition.json").read_text())
    assert list(report["runs"]) == ["train"] and not (tmp_path / "bench_partition.json").exists()
    assert out.splitlines()[-1] == f"wrote {Path('runs') / 'bench_partition.json'}"
    if partitions == ["2"]:
        assert "no P=1 run: peak memory and speed-up against one process not computed (add 1 to --partitions)" in out
    else:
        assert "train P=2: peak/rank 0.500 of P=1 (target 1.25/P = 0.625)" in out and "speed-up 2.00x" in out
    assert _git_ignores(Path("runs") / "bench_partition.json")


def _git_ignores(rel) -> bool:
    """Whether git ignores ``rel`` in this repository (the default outputs must not show up as new files)."""
    import subprocess

    return subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO).returncode == 0
