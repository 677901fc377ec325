"""Two "nodes" on this machine: two torchrun invocations (``--nnodes 2 --node_rank 0/1
--nproc_per_node 2``, c10d rendezvous on 127.0.0.1, gloo) started together, 4 ranks in all.

Against the one-process run, with the tolerances of the single-node tests (test_deepspeed.py):
ZeRO-2 (float64 model, fp32 master weights): trajectory and consolidated best.pt weights 1e-5
relative; parallel.graph_partitions=2 (2 data-parallel x 2 partitions, plain torch, float64):
1e-8. One run folder per run (global rank 0 writes). The partitioned run interrupted after 1 of
2 epochs and resumed on two nodes equals the uninterrupted two-node run (1e-10). A partition
count that does not divide the ranks per node stops both nodes with one ConfigError line.
Each two-node launch takes ~30-50 s on 2 cores (4 processes start and import).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch

from test_deepspeed import RESUME_SCRIPT, _same_trajectory
from test_train_common import (
    PY, REPO, empty_config, env, epoch_rows, free_port, results, sets, tiny_config, tiny_overrides, train_in_process,
)

pytestmark = pytest.mark.slow
TIMEOUT = 300


def two_node_cmd(node_rank: int, port: int, *args) -> list[str]:
    """The README's multi-node torchrun line, node ``node_rank`` of 2, 2 ranks per node."""
    return [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "2",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", *args]


def run_two_nodes(cwd, *args, check=True) -> list[tuple[int, str]]:
    """Both nodes started together, both waited for (bounded); (returncode, output) per node."""
    port = free_port()
    procs = [subprocess.Popen(two_node_cmd(i, port, *args), cwd=cwd, env=env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in (0, 1)]
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rc, text in out:
        assert rc == 0 or not check, text[-5000:]
    return out


def _one_folder(root, name):
    """Exactly one run folder was written under ``root`` (global rank 0 alone writes)."""
    folders = [p.name for p in root.iterdir() if p.is_dir() and (p / "config.yaml").exists()]
    assert folders == [name], folders


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    train_in_process(tiny_config(root, run_name="fp64", dtype="float64"))
    return root / "fp64"


def test_two_nodes_zero2_follows_one_process(reference, tmp_path):
    over = tiny_overrides(tmp_path, "deepspeed.zero_stage=2", "memory.micro_batch_size=1", dtype="float64",
                          run_name="zero2")
    out = run_two_nodes(tmp_path, str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over))
    text = "".join(t for _, t in out)
    assert "DeepSpeed ZeRO stage 2" in text and text.count("run folder:") == 1
    _one_folder(tmp_path, "zero2")
    run = tmp_path / "zero2"
    _same_trajectory(reference, run, rel=1e-5)
    ck = torch.load(run / "best.pt", weights_only=True)
    ref = torch.load(reference / "best.pt", weights_only=True)
    assert ck["model"].keys() == ref["model"].keys()
    for k in ref["model"]:
        assert ck["model"][k].shape == ref["model"][k].shape, k
        if ref["model"][k].is_floating_point():
            torch.testing.assert_close(ck["model"][k], ref["model"][k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """parallel.graph_partitions=2 on two nodes, through the resume script (no interruption)."""
    root = tmp_path_factory.mktemp("two_nodes")
    script = root / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    over = tiny_overrides(root, "parallel.graph_partitions=2", dtype="float64", run_name="full")
    out = run_two_nodes(root, str(script), json.dumps(over), "", "0")
    return root, script, "".join(t for _, t in out)


def test_two_nodes_graph_partitions_follow_one_process(reference, partitioned):
    root, _, text = partitioned
    assert "2 data-parallel x 2 graph partitions" in text and text.count("run folder:") == 1
    _one_folder(root, "full")
    _same_trajectory(reference, root / "full", rel=1e-8)
    ck = torch.load(root / "full" / "best.pt", weights_only=True)
    ref = torch.load(reference / "best.pt", weights_only=True)
    for k in ref["model"]:
        if ref["model"][k].is_floating_point():
            torch.testing.assert_close(ck["model"][k], ref["model"][k], rtol=1e-8, atol=1e-10, msg=k)


def test_two_nodes_resume_continues_exactly(partitioned):
    root, script, _ = partitioned
    part = tiny_overrides(root, "parallel.graph_partitions=2", dtype="float64", run_name="part")
    run_two_nodes(root, str(script), json.dumps(part), "", "1")
    assert len(epoch_rows(root / "part")) == 1 and not (root / "part" / "results.json").exists()
    run_two_nodes(root, str(script), json.dumps(part), str(root / "part"), "0")
    _same_trajectory(root / "full", root / "part", rel=1e-10)
    assert results(root / "part")["test_force_mae_meV_per_A"] == pytest.approx(
        results(root / "full")["test_force_mae_meV_per_A"], rel=1e-10)


def test_two_nodes_partitions_across_nodes_refused(tmp_path):
    """P=4 on 2 nodes of 2 ranks would split a molecule over two nodes: one error line, no run folder."""
    over = tiny_overrides(tmp_path, "parallel.graph_partitions=4", dtype="float64", run_name="p4")
    out = run_two_nodes(tmp_path, str(REPO / "train.py"), "--config", empty_config(tmp_path), *sets(over), check=False)
    assert all(rc != 0 for rc, _ in out)
    text = "".join(t for _, t in out)
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert lines == ["error: parallel.graph_partitions=4 must divide the ranks per node (2, LOCAL_WORLD_SIZE) on a "
                     "multi-node run, so that a molecule's partitions sit on one node"], text[-3000:]
    assert not (tmp_path / "p4").exists()
