"""tools/bench_model.py: the trainer's step timed, and its counters (ATen calls per step from the
profiler, the matmul FLOP rate against a plain gemm) reported and written to the JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASPIRIN = ROOT / "scalable_equiformer" / "demo_data" / "aspirin_xtb_500K.npz"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "tools" / "bench_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counters_are_positive_and_written(tmp_path):
    out = tmp_path / "b.json"
    rc = _bench().main(
        [
            "--tiny", "--data", str(ASPIRIN), "--batch-size", "2", "--repeats", "1",
            "--modes", "train_step", "--threads", "1", "--json", str(out),
        ]
    )
    assert rc == 0
    (entry,) = json.loads(out.read_text())["datasets"]
    assert entry["batch_size"] == 2 and entry["modes"]["train_step"]["median_s"] > 0
    train, infer = entry["counters"]["train_step"], entry["counters"]["inference_step"]
    for c in (train, infer):
        assert 0 < c["aten_calls_leaf"] < c["aten_calls"] and 0 < c["aten_calls_top"] < c["aten_calls"]
        assert c["matmul_gflop"] > 0 and c["step_s"] > 0 and c["gemm_gflops_per_s"] > 0
        assert c["matmul_gflops_per_s"] > 0 and 0 < c["fraction_of_gemm"]
        assert c["aten_calls_by_op"] and all(k.startswith("aten::") for k in c["aten_calls_by_op"])
        shares = [v["self_share"] for v in c["aten_self_time_by_op"].values()]
        assert shares and all(0 <= x <= 1 for x in shares) and sum(shares) <= 1 + 1e-9
    # the training step (create_graph, double backward, AdamW) does more than the inference step
    assert train["aten_calls"] > infer["aten_calls"] and train["matmul_gflop"] > infer["matmul_gflop"]
    # the train_step's time is the timed mode's median
    assert train["step_s"] == entry["modes"]["train_step"]["median_cpu_s"]  # CPU time on the CPU


def test_train_step_is_the_trainers_optimizer_step(monkeypatch):
    bench = _bench()
    calls = []
    real = bench.optimizer_step
    monkeypatch.setattr(bench, "optimizer_step", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    rc = bench.main(["--tiny", "--data", str(ASPIRIN), "--repeats", "1", "--modes", "train_step", "--no-counters",
                     "--threads", "1"])
    assert rc == 0 and len(calls) == 2  # warm-up and one timed step
    cfg = calls[0]
    assert (cfg.train.loss, cfg.train.energy_weight, cfg.train.force_weight) == ("l2mae", 1.0, 80.0)
