"""``train.compile``: the traced-and-compiled energy-and-forces function (``training/compiled.py``).

* the traced graph gives the eager energies, forces and force-loss parameter gradients (fp64,
  1e-10), for molecules and batches of sizes other than the one it was traced with;
* the detach trap: keeping the ``aten.detach`` nodes of autograd's saved tensors leaves energies
  and forces exact but the parameter gradients wrong (> 1e-3 relative);
* compiled by inductor (slow): fp32 round-off against eager, for three batch sizes, with a bounded
  number of compilations;
* ``train.py ... train.compile=true`` trains (slow); the combinations it does not support are
  one-line config errors.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from helpers import tiny_model_config
from helpers.equivariance import as_batch, make_molecule, single_thread  # noqa: F401 (fixture)
from test_train_common import launch, sets, tiny_overrides, train_cmd

from scalable_equiformer.config import load_config
from scalable_equiformer.errors import ConfigError
from scalable_equiformer.model import build_model
from scalable_equiformer.training import compiled
from scalable_equiformer.training.steps import model_call

pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = ((7, 9), (5, 6, 8), (12,))  # atoms per molecule of three batches
#: three batch sizes in one of the compiled size classes (more than 16 atoms, more than one molecule)
SIZES_ONE_CLASS = ((9, 9), (8, 10, 5), (11, 12))

#: the tiny model cut to lmax 1 and one block (as test_train_common.TINY): a smaller graph to trace
#: and compile (inductor's cold compile of it: ~1.5-3 min on two busy cores)
SMALL = dict(lmax=1, num_blocks=1, irreps_node="8x0e+4x1e", irreps_head="4x0e+2x1e", irreps_feedforward="16x0e+4x1e",
             radial_hidden=[8])


def _model(dtype: str, small: bool = True):
    import dataclasses

    torch.manual_seed(0)
    cfg = tiny_model_config(dtype=dtype)
    if small:
        cfg = dataclasses.replace(cfg, **SMALL)
    return build_model(cfg).train()


def _step(model, batch, fn):
    """Energy, forces and the parameter gradients of a force (and energy) loss."""
    model.zero_grad(set_to_none=True)
    out = fn(batch)
    target = torch.randn(out["forces"].shape, generator=torch.Generator().manual_seed(1), dtype=out["forces"].dtype)
    loss = (out["forces"] - target).pow(2).sum() + out["energy"].pow(2).sum()
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return out["energy"].detach(), out["forces"].detach(), grads


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _batch(sizes, dtype):
    return as_batch(*[make_molecule(n, seed=i, dtype=dtype) for i, n in enumerate(sizes)])


@pytest.mark.parametrize("keep", [False, True], ids=["detaches_removed", "detaches_kept"])
def test_traced_graph_equals_eager_and_the_detach_trap(keep):
    """The traced graph run without compiling (the same graph inductor compiles), fp64."""
    model = _model("float64")
    fn = compiled.CompiledEnergyForces(model, keep_saved_detaches=keep, compile=False)
    for sizes in SIZES:  # traced once, on the first batch; the others reuse the symbolic graph
        batch = _batch(sizes, torch.float64)
        e0, f0, g0 = _step(model, batch, lambda b: model(b))
        e1, f1, g1 = _step(model, batch, lambda b: compiled.compiled_energy_and_forces(model, b, fn=fn))
        assert _rel(e1, e0) < 1e-12 and _rel(f1, f0) < 1e-12, sizes
        if keep:  # energies and forces exact, gradients of the force loss wrong
            assert _rel(g1, g0) > 1e-3, sizes
        else:
            assert _rel(g1, g0) < 1e-10, sizes
    assert fn.traces == 1


def test_removal_keeps_the_models_own_detach():
    """The softmax's ``logits.detach()`` (nn/attention.py) stays in the graph; only autograd's go."""
    model = _model("float64")
    batch = _batch((5, 6), torch.float64)
    fn = compiled.CompiledEnergyForces(model, compile=False)
    compiled.compiled_energy_and_forces(model, batch, fn=fn)
    kept = [n for n in fn.gm.graph.nodes if n.target is torch.ops.aten.detach.default]
    assert len(kept) == model.num_blocks  # the scatter_softmax of each block
    assert all(u.target is torch.ops.aten.scatter_reduce.two for n in kept for u in n.users)
    assert fn.detaches_removed > 0


@pytest.mark.slow
def test_compiled_equals_eager_fp32_and_other_sizes_do_not_recompile():
    """Inductor-compiled: fp32 round-off against eager for three batch sizes of one size class
    (> 16 atoms, > 1 molecule: 18, 23 and 23 atoms), one compilation for all three (the size
    classes: training/compiled.py's docstring)."""
    torch._dynamo.reset()
    model = _model("float32")
    fn = compiled.CompiledEnergyForces(model)
    before = compiled.compile_count()
    for sizes in SIZES_ONE_CLASS:
        batch = _batch(sizes, torch.float32)
        e0, f0, g0 = _step(model, batch, lambda b: model(b))
        e1, f1, g1 = _step(model, batch, lambda b: compiled.compiled_energy_and_forces(model, b, fn=fn))
        assert _rel(e1, e0) < 1e-5 and _rel(f1, f0) < 1e-4 and _rel(g1, g0) < 1e-4, sizes
    assert compiled.compile_count() - before == 1
    assert fn.traces == 1


def test_model_call_uses_the_compiled_path_in_training_only(monkeypatch):
    cfg = load_config(None, ["data.path=x.npz", "train.compile=true"])
    model = _model("float64")
    calls = []
    monkeypatch.setattr(compiled, "compiled_energy_and_forces", lambda m, b: calls.append(m) or {"energy": 0})
    batch = _batch((5,), torch.float64)
    model_call(model, batch, cfg)
    assert calls == [model]
    model.eval()
    out = model_call(model, batch, cfg)  # evaluation: eager
    assert calls == [model] and out["forces"].shape == (5, 3)

    class Wrapper(torch.nn.Module):  # e.g. a DeepSpeed engine: .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    with pytest.raises(ConfigError, match="train.compile"):
        model_call(Wrapper(model.train()), batch, cfg)


@pytest.mark.parametrize("override,key", [
    ("memory.checkpointing=forces", "memory.checkpointing"),
    ("memory.checkpointing=blocks", "memory.checkpointing"),
    ("memory.precision=bf16", "memory.precision"),
    ("parallel.graph_partitions=2", "parallel.graph_partitions"),
    ("deepspeed.zero_stage=2", "deepspeed.zero_stage"),
    ("deepspeed.enabled=true", "deepspeed.enabled"),
    ("model.alpha_drop=0.1", "model.alpha_drop"),
    ("model.drop_path=0.1", "model.drop_path"),
])
def test_unsupported_combinations_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.compile=true", override])
    msg = str(err.value)
    assert "\n" not in msg and "train.compile" in msg and key in msg
    load_config("tiny", [override])  # fine without train.compile
    assert load_config("tiny").train.compile is False  # off by default


def test_train_py_refuses_a_bad_combination_in_one_line(tmp_path):
    proc = launch(train_cmd("--config", "tiny", "--set", "train.compile=true", "memory.checkpointing=forces"),
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.compile" in err[0], proc.stderr


@pytest.mark.slow
def test_train_py_with_compile_trains(tmp_path):
    over = tiny_overrides(tmp_path, "train.compile=true", epochs=1, dtype="float32")
    proc = launch(train_cmd("--config", "tiny", *sets(over)), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "val force MAE" in proc.stdout
    assert (tmp_path / "run" / "results.json").is_file()
