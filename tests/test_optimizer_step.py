"""The memory profiler measures the trainer's own optimizer step (``training/steps.optimizer_step``):
on the same batch from the same weights, the profiler's step (``profiling/measured_step.make_step``)
and the trainer's (``Trainer._train_step``) give the same loss and the same gradients (after
clipping, as the optimizer sees them), with the engine's between-micro-batch hook called only
between micro-batches."""

from __future__ import annotations

import copy

import pytest
import torch

from test_train_common import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _record(engine):
    """Gradients as the optimizer sees them, and the count of ``after_micro`` calls."""
    seen = {"grads": None, "after_micro": 0}

    def grads(opt, args, kwargs):
        seen["grads"] = [p.grad.detach().clone() for p in engine.module.parameters() if p.grad is not None]

    engine.optimizer.register_step_pre_hook(grads)
    after = engine.after_micro

    def counted():
        seen["after_micro"] += 1
        after()

    engine.after_micro = counted
    return seen


def test_profiler_step_equals_trainer_step(tmp_path):
    from scalable_equiformer import runtime
    from scalable_equiformer.profiling import measured_step
    from scalable_equiformer.training.batches import collate
    from scalable_equiformer.training.trainer import Trainer

    # two micro-batches of 2 and clipping: the parts of the step the two once wrote twice
    cfg = tiny_config(tmp_path, "memory.micro_batch_size=2", "train.grad_clip=0.01")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert trainer.plan.grad_accum == 2
        weights = copy.deepcopy(trainer.engine.module)  # the weights before the step
        order = trainer.sampler.order(1)
        frames = trainer.sampler.global_batch(1, 0, order)
        seen_t = _record(trainer.engine)
        loss_t = trainer._train_step(1, 0, order)

        step, engine = measured_step.make_step(weights, trainer.cfg, loss_scale=trainer.loss_scale)
        seen_p = _record(engine)
        loss_p = step(collate(trainer.train_ds, frames, trainer.device))["loss"]
    finally:
        trainer.close()
        runtime.shutdown_distributed()

    assert loss_t > 0 and loss_p == pytest.approx(loss_t, rel=1e-12, abs=0)
    assert seen_t["after_micro"] == seen_p["after_micro"] == 1  # between the two micro-batches only
    assert len(seen_p["grads"]) == len(seen_t["grads"]) > 0
    for gp, gt in zip(seen_p["grads"], seen_t["grads"]):
        assert torch.allclose(gp, gt, rtol=1e-12, atol=1e-15)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen_t["grads"]]))
    assert float(norm) == pytest.approx(0.01, rel=1e-6)  # clipped, as the optimizer saw them


def test_fused_adamw_is_the_loops_update():
    """The plain engine's fused AdamW (training/engine.make_optimizer) makes the per-parameter loop's
    update: five steps in float64 agree to 1e-14, weight decay and its no-decay group included."""
    from scalable_equiformer.config import OptimConfig
    from scalable_equiformer.training.engine import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).double()
    twin = copy.deepcopy(model)
    optim = OptimConfig(lr=1e-2, weight_decay=0.05)
    fused, loop = make_optimizer(model, optim, fused=True), make_optimizer(twin, optim)
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0]["fused"]
    assert len(fused.param_groups) == 2  # biases and norms without decay
    for step in range(5):
        x = torch.randn(11, 7, dtype=torch.float64)
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
