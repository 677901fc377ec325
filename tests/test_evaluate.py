"""tools/evaluate.py: metrics of a checkpoint equal the trainer's; 2 ranks equal 1 rank; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from test_train_common import DEMO_DATA, PY, REPO, free_port, launch, results, tiny_config, train_in_process

EVALUATE = str(REPO / "tools" / "evaluate.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    train_in_process(tiny_config(root, "train.ema_decay=0.8", test=20, dtype="float64"))
    return root / "run"


def _json(path):
    return json.loads(path.read_text())


def test_evaluate_reproduces_the_test_metrics_of_the_run(trained, tmp_path):
    out = tmp_path / "m.json"
    proc = launch([PY, EVALUATE, str(trained / "best.pt"), "--data", str(DEMO_DATA), "--split", "test",
                   "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meV per molecule" in proc.stdout and "meV/Å" in proc.stdout
    m, r = _json(out), results(trained)
    assert m["n_frames"] == r["n_test_frames"] == 20
    assert m["energy_mae_meV"] == pytest.approx(r["test_energy_mae_meV"], rel=1e-12)
    assert m["force_mae_meV_per_A"] == pytest.approx(r["test_force_mae_meV_per_A"], rel=1e-12)
    assert m["force_mae_kcal_per_mol_per_A"] == pytest.approx(r["test_force_mae_kcal_per_mol_per_A"], rel=1e-12)
    assert "splits.npz" in m["split_source"]


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank(trained, tmp_path):
    """20 test frames dealt over 2 ranks (10 + 10, batches of 8: 8 + 2 each): sums all-reduced."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = [str(trained / "best.pt"), "--data", str(DEMO_DATA), "--split", "test", "--batch-size", "8"]
    p1 = launch([PY, EVALUATE, *args, "--json", str(one)], cwd=tmp_path)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = launch([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                 EVALUATE, *args, "--json", str(two)], cwd=tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    a, b = _json(one), _json(two)
    assert a["n_frames"] == b["n_frames"] == 20
    for k in ("energy_mae_meV", "force_mae_meV_per_A", "energy_rmse_meV", "force_rmse_meV_per_A",
              "force_l2mae_meV_per_A"):
        assert b[k] == pytest.approx(a[k], rel=1e-12), k


def test_evaluate_in_process_two_shards_sum_exactly(trained):
    """The aggregation itself: per-rank sums added, then divided (not a mean of per-rank means)."""
    import numpy as np

    from scalable_equiformer.config import config_from_dict
    from scalable_equiformer.data import load_dataset
    from scalable_equiformer.data.statistics import DatasetStatistics
    from scalable_equiformer.model import build_model
    from scalable_equiformer.training.batches import collate, eval_shards
    from scalable_equiformer.training.checkpoint import load_checkpoint, load_model_state
    from scalable_equiformer.training.metrics import ErrorSums, evaluate

    ck = load_checkpoint(trained / "best.pt")
    cfg = config_from_dict(ck["config"])
    model = build_model(cfg, DatasetStatistics.from_dict(ck["stats"]))
    load_model_state(model, ck["model"], "best.pt")
    ds = load_dataset(DEMO_DATA)
    idx = np.arange(7)  # uneven: 4 + 3 frames
    whole = evaluate(model, ds, idx, cfg, torch.device("cpu"), batch_size=3)
    sums = []
    for rank in range(2):
        s = ErrorSums()
        for b in eval_shards(idx, rank, 2, 3):
            batch = collate(ds, b, torch.device("cpu"))
            model.eval()
            s.add(model(batch), batch)
        sums.append(s)
    total = ErrorSums()
    total.v = sums[0].v + sums[1].v
    for k, v in total.metrics().items():
        assert v == pytest.approx(whole[k], rel=1e-12), k


def test_evaluate_bad_input_is_one_line(trained, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    proc = launch([PY, EVALUATE, str(bad), "--data", str(DEMO_DATA)], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a readable checkpoint" in lines[0]
    proc = launch([PY, EVALUATE, str(trained / "best.pt"), "--data", "md17_aspirin", "--root", str(tmp_path)],
                  cwd=tmp_path)
    assert proc.returncode == 2 and "tools/download.py" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_partitioned_evaluation_equals_one_process(trained, tmp_path):
    """--partitions 2 from a plain process: 2 local gloo ranks share each molecule's graph; the
    metrics equal the one-process evaluation (fp64 model, 1e-9 relative)."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = [str(trained), "--data", str(DEMO_DATA), "--split", "test", "--batch-size", "8", "--max-frames", "10"]
    p1 = launch([PY, EVALUATE, *args, "--json", str(one)], cwd=tmp_path)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = launch([PY, EVALUATE, *args, "--partitions", "2", "--json", str(two)], cwd=tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "over 2 partitions" in p2.stdout and p2.stdout.count("wrote ") == 1  # rank 0 reports
    a, b = _json(one), _json(two)
    assert a["n_frames"] == b["n_frames"] == 10 and b["partitions"] == 2
    for k in ("energy_mae_meV", "force_mae_meV_per_A", "energy_rmse_meV", "force_rmse_meV_per_A",
              "force_l2mae_meV_per_A"):
        assert b[k] == pytest.approx(a[k], rel=1e-9), k
    bad = launch([PY, EVALUATE, str(trained), "--data", str(tmp_path / "missing.npz"), "--partitions", "2"],
                 cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr[-2000:]


def test_load_model_weights_and_errors(trained, tmp_path):
    """One loader for evaluate.py and the calculator: a run folder means best.pt; EMA weights by
    default (what the run evaluated), live weights from last.pt; one-line errors naming the file."""
    from scalable_equiformer.errors import CheckpointError
    from scalable_equiformer.inference import load_model
    from scalable_equiformer.training.checkpoint import load_checkpoint

    model, cfg, info = load_model(trained)
    assert info["path"] == trained / "best.pt" and info["weights"] == "ema" and not model.training
    best = load_checkpoint(trained / "best.pt")["model"]
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point() and k in best)
    assert torch.equal(model.state_dict()[name], best[name])
    last = load_checkpoint(trained / "last.pt")
    live, _, info = load_model(trained / "last.pt", ema=False)
    assert info["weights"] == "live"
    assert any(not torch.equal(live.state_dict()[k], last["model"][k]) for k in last["live_model"] if k in last["model"]
               and last["model"][k].is_floating_point())
    assert all(torch.equal(live.state_dict()[k], v) for k, v in last["live_model"].items() if k in live.state_dict())
    m32, _, _ = load_model(trained, dtype="float32")
    assert next(m32.parameters()).dtype == torch.float32
    with pytest.raises(CheckpointError, match="only the EMA weights"):
        load_model(trained / "best.pt", ema=False)
    with pytest.raises(CheckpointError, match="best.pt: checkpoint not found"):
        load_model(tmp_path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a scalable_equiformer checkpoint"):
        load_model(foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((trained / "best.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt.pt: not a readable checkpoint") as exc:
        load_model(corrupt)
    assert "\n" not in str(exc.value)


def _evaluate_main(argv, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", EVALUATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = mod.main(argv)
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_evaluate_names_the_file_it_writes_and_says_when_it_replaces_one(trained, tmp_path, capsys):
    """It said "kcal/mol twins in results.json" while writing best.<data>.<split>.json, and a second
    evaluation of the same split replaced the first without a word."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "splits.npz"):
        shutil.copy2(trained / name, run / name)
    dest = run / f"best.{DEMO_DATA.stem}.test.json"
    argv = [str(run / "best.pt"), "--data", str(DEMO_DATA), "--max-frames", "4"]
    rc, out, err = _evaluate_main(argv, capsys)
    assert rc == 0 and err == "", err
    assert f"kcal/mol twins in {dest}" in out and "results.json" not in out and out.splitlines()[-1] == f"wrote {dest}"
    first = _json(dest)
    rc, out, err = _evaluate_main(argv + ["--batch-size", "2"], capsys)
    assert rc == 0 and out.splitlines()[-1] == f"wrote {dest}"
    assert err.splitlines() == [f"warning: {dest} held an earlier result ({first['checkpoint']} "
                                f"epoch {first['epoch']}, test split, force MAE {first['force_mae_meV_per_A']:.4f} "
                                "meV/Å): replaced by this one"]
    other = trained / "results.json"  # the run's own results, given as --json by mistake: kept
    before = other.read_text()
    rc, out, err = _evaluate_main(argv + ["--json", str(other)], capsys)
    assert rc == 2 and out == "" and other.read_text() == before
    assert err.splitlines() == [f"error: {other}: exists and is not an evaluate.py result; give another --json file or "
                                "move it away"]
