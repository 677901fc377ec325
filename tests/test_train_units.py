"""Pieces of the trainer: LR schedule, losses, batch plan, EMA, metrics, atomic checkpoints."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from scalable_equiformer.errors import CheckpointError


def test_schedule_warmup_then_cosine_to_min():
    from scalable_equiformer.training.schedule import LRSchedule

    s = LRSchedule(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s(110) == pytest.approx(1e-5) and s(500) == pytest.approx(1e-5)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    c = LRSchedule(1e-3, 1e-6, 1e-5, 0, 100, kind="constant")
    assert c(0) == c(99) == 1e-3


class _Batch:
    def __init__(self, energy, forces):
        self.energy, self.forces = energy, forces


def test_l2mae_loss_is_the_original_and_shares_sum_to_the_full_batch():
    from scalable_equiformer.training.loss import loss_terms

    torch.manual_seed(0)
    e_ref, e_pred = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    f_ref, f_pred = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    full = loss_terms({"energy": e_pred, "forces": f_pred}, _Batch(e_ref, f_ref), "l2mae", 1.0, 80.0, scale=2.0)
    expected = ((e_pred - e_ref).abs().mean() + 80 * (f_pred - f_ref).norm(dim=-1).mean()) / 2.0
    assert float(full.loss) == pytest.approx(float(expected), rel=1e-14)
    # molecules of 3 and 7 atoms: micro-batch shares of the global counts add up to the full loss
    a = loss_terms({"energy": e_pred[:1], "forces": f_pred[:3]}, _Batch(e_ref[:1], f_ref[:3]), "l2mae",
                   1.0, 80.0, 2.0, 4, 10)
    b = loss_terms({"energy": e_pred[1:], "forces": f_pred[3:]}, _Batch(e_ref[1:], f_ref[3:]), "l2mae",
                   1.0, 80.0, 2.0, 4, 10)
    assert float(a.loss + b.loss) == pytest.approx(float(full.loss), rel=1e-14)
    mse = loss_terms({"energy": e_pred, "forces": f_pred}, _Batch(e_ref, f_ref), "mse", 2.0, 3.0, scale=2.0)
    expected_mse = (2 * (e_pred - e_ref).pow(2).mean() + 3 * (f_pred - f_ref).pow(2).mean()) / 4
    assert float(mse.loss) == pytest.approx(float(expected_mse))
    mae = loss_terms({"energy": e_pred, "forces": f_pred}, _Batch(e_ref, f_ref), "mae", 1.0, 1.0)
    assert float(mae.loss) == pytest.approx(float((e_pred - e_ref).abs().mean() + (f_pred - f_ref).abs().mean()))


def test_step_sampler_shards_are_disjoint_and_cover_the_batch():
    from scalable_equiformer.config import load_config
    from scalable_equiformer.training.batches import BatchPlan, StepSampler, eval_shards

    cfg = load_config(None, ["data.path=x", "train.batch_size=8", "memory.micro_batch_size=2"])
    plan = BatchPlan.from_config(cfg, dp_world=2)
    samplers = [StepSampler(37, plan, seed=3, dp_rank=r) for r in range(2)]
    assert samplers[0].steps_per_epoch == 4  # drop_last
    g = samplers[0].global_batch(epoch=2, step_in_epoch=1)
    parts = [np.concatenate(s.micro_batches(g)) for s in samplers]
    assert sorted(np.concatenate(parts)) == sorted(g) and len(set(parts[0]) & set(parts[1])) == 0
    assert not np.array_equal(samplers[0].order(1), samplers[0].order(2))
    assert np.array_equal(samplers[0].order(2), StepSampler(37, plan, 3, 0).order(2))  # resumable
    idx = np.arange(11)
    shards = [np.concatenate(eval_shards(idx, r, 3, 2)) for r in range(3)]
    assert sorted(np.concatenate(shards)) == list(idx)


def test_ema():
    from scalable_equiformer.training.ema import EMA

    w = {"a": torch.zeros(3)}
    ema = EMA(w, decay=0.5)
    ema.update({"a": torch.ones(3)})  # warm-up decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["a"], torch.full((3,), 0.9))
    state = ema.state_dict()
    other = EMA(w, 0.5)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.shadow["a"], ema.shadow["a"])


def test_ema_state_loads_onto_the_device_of_the_weights():
    """A resumed GPU run reads its checkpoint onto the CPU; the averages must go back to where the
    weights are (here the meta device stands in for a GPU)."""
    from scalable_equiformer.training.ema import EMA

    saved = EMA({"a": torch.ones(3, dtype=torch.float64)}, 0.5).state_dict()
    live = EMA({"a": torch.zeros(3, device="meta")}, 0.5)
    live.load_state_dict(saved)
    assert live.shadow["a"].device.type == "meta" and live.shadow["a"].dtype == torch.float32
    live.update({"a": torch.zeros(3, device="meta")})


def test_checkpoint_atomic_weights_only_and_corrupt(tmp_path):
    from scalable_equiformer.training.checkpoint import check_same_model, load_checkpoint, save_checkpoint

    p = tmp_path / "last.pt"
    save_checkpoint(p, {"config": {"model": {"a": 1}}, "model": {"w": torch.ones(2)}, "stats": {"x": 1.0}})
    assert [x.name for x in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    ck = torch.load(p, weights_only=True)
    assert ck["format"] == 1 and torch.equal(ck["model"]["w"], torch.ones(2))
    assert load_checkpoint(tmp_path)["model"]["w"].sum() == 2
    with pytest.raises(CheckpointError, match="different model config"):
        check_same_model({"model": {"a": 1}}, {"model": {"a": 2}}, p)
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a scalable_equiformer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_use_deepspeed_rules():
    from scalable_equiformer.config import load_config
    from scalable_equiformer.errors import ConfigError
    from scalable_equiformer.training.engine import use_deepspeed

    cfg = lambda *o: load_config(None, ["data.path=x", *o])  # noqa: E731
    assert not use_deepspeed(cfg(), "none", 1)
    assert use_deepspeed(cfg(), "torchrun", 2) and use_deepspeed(cfg(), "deepspeed", 1)
    assert use_deepspeed(cfg("deepspeed.zero_stage=2"), "none", 1)
    assert not use_deepspeed(cfg("deepspeed.enabled=false"), "torchrun", 2)
    assert not use_deepspeed(cfg("model.dtype=float64"), "torchrun", 2)  # DeepSpeed stage 0 all-reduces no fp64
    with pytest.raises(ConfigError, match="zero_stage=2 needs DeepSpeed"):
        use_deepspeed(cfg("deepspeed.enabled=false", "deepspeed.zero_stage=2"), "none", 1)


def test_demo_data_path_resolves_from_anywhere(tmp_path, monkeypatch):
    from scalable_equiformer.config import load_config
    from scalable_equiformer.data.dataset import resolve_data_path

    monkeypatch.chdir(tmp_path)
    path = resolve_data_path(load_config("demo").data.path)
    assert path.endswith("aspirin_xtb_500K.npz") and __import__("os").path.isfile(path)
