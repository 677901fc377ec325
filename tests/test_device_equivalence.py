"""The equivalences that matter on a GPU, with the tensors on the device that ``--device`` names.

    pytest tests/test_device_equivalence.py -m gpu_equivalence --device cuda   # benchmarks/gpu/run.sh

With the default ``--device cpu`` they run in CI like any test; on a GPU the same assertions hold
for CUDA kernels (atomics in ``index_add``, cuBLAS, CUDA autocast's op lists, gloo moving CUDA
tensors). They use only what ships in the package (the aspirin demo frames), so they run on a
machine that gets the checkout alone (no ``../shared``).

* memory levers against the plain path, fp64, 1e-10: ``blocks``, ``forces``, ``forces`` + edge
  chunks, ``forces`` + a kept block (energies, forces, parameter gradients);
* two optimizer steps through the trainer's own step (``profiling/measured_step.py``: PlainEngine,
  AdamW, the loss) with ``forces`` equal the plain ones, fp64;
* bf16 autocast on the device within the tolerance ``nn/precision.py`` states against fp32;
* the partitioned model over 2 ranks (gloo between them, both on the device: one GPU holds both)
  against one process on the device, plain and force-aware strategies, fp64 1e-9;
* the ASE calculator on the device against the calculator on the CPU, fp64.

Not here: ZeRO stages over several ranks (NCCL needs one GPU per rank; ``benchmarks/gpu/run.sh``
trains with ZeRO-2 on one GPU instead) and the CUDA autocast emulation on the CPU
(``tests/test_device_agnostic.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from scalable_equiformer.config import load_config
from scalable_equiformer.memory import force_checkpoint as fc
from scalable_equiformer.memory import ForceRunner, Levers
from scalable_equiformer.memory.precision import autocast
import partition_harness as C
from scalable_equiformer.profiling import measured_step
from scalable_equiformer.data.dataset import PACKAGE_DIR

pytestmark = pytest.mark.gpu_equivalence

ASPIRIN = PACKAGE_DIR / "demo_data" / "aspirin_xtb_500K.npz"
TOL64 = 1e-10
#: bf16 against fp32, relative norms (forces, parameter gradients): nn/precision.py
TOL_BF16 = (0.05, 0.10)


@pytest.fixture(scope="module")
def frames():
    with np.load(ASPIRIN) as d:
        return np.asarray(d["z"], np.int64), np.asarray(d["R"][:4], np.float64)


def _tiny(dtype="float64", **kw):
    return C.build_checked_model(C.tiny_model_config(dtype=dtype, **kw), seed=0)


def _batch(frames, dtype, device, n=2, seed=1):
    z, R = frames
    batch = measured_step.make_batch(z, R[:n], dtype, device)
    g = torch.Generator().manual_seed(seed)
    batch.forces = torch.randn(batch.forces.shape, generator=g, dtype=dtype).to(device)
    batch.energy = torch.randn(batch.energy.shape, generator=g, dtype=dtype).to(device)
    return batch


def _step(model, batch, strategy, chunk=None, keep=0):
    model.zero_grad(set_to_none=True)
    out = ForceRunner(Levers(strategy, edge_chunk_size=chunk, keep_blocks=keep))(model, batch, training=True)
    f = out["forces"].to(batch.forces.dtype)
    loss = (out["energy"] - batch.energy).abs().sum() + 80 * torch.linalg.vector_norm(f - batch.forces, dim=-1).mean()
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out["energy"].detach().double().cpu(), out["forces"].detach().double().cpu(), grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("strategy,chunk,keep", [("blocks", None, 0), ("forces", None, 0), ("forces", 40, 0),
                                                 ("forces", None, 1)],
                         ids=["blocks", "forces", "forces+chunks", "forces+keep1"])
def test_lever_equals_plain_on_device(frames, device, strategy, chunk, keep):
    model = _tiny().to(device).train()
    batch = _batch(frames, torch.float64, device)
    if chunk is not None:
        assert len(fc.edge_chunks(model.build_graph(batch.pos, batch.batch), batch.pos.shape[0], chunk)) > 3
    e0, f0, g0 = _step(model, batch, "none")
    e1, f1, g1 = _step(model, batch, strategy, chunk, keep)
    torch.testing.assert_close(e1, e0, rtol=TOL64, atol=TOL64)
    torch.testing.assert_close(f1, f0, rtol=TOL64, atol=TOL64)
    assert set(g1) == set(g0) and len(g0) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, g in g0.items():
        assert float((g1[name] - g).abs().max()) <= TOL64 * max(float(g.abs().max()), 1.0), name


def test_training_steps_with_force_checkpointing_equal_plain_on_device(frames, device):
    """Two optimizer steps of the trainer's own step (PlainEngine, AdamW, l2mae loss) on the device."""
    losses = {}
    for lever in ("none", "forces"):
        cfg = load_config(None, ["data.name=x", "model.dtype=float64", f"memory.checkpointing={lever}",
                                 *(f"model.{k}={v}" for k, v in C.tiny_model().items())])
        torch.manual_seed(0)
        model, dtype = measured_step.build(cfg, device, 21)
        step, _ = measured_step.make_step(model, cfg)
        batch = _batch(frames, dtype, device, n=3)
        losses[lever] = [step(batch)["loss"] for _ in range(2)]
        assert next(model.parameters()).device.type == device.type
    assert losses["forces"] == pytest.approx(losses["none"], rel=1e-9)
    assert losses["none"][1] != losses["none"][0]  # the optimizer stepped


@pytest.mark.parametrize("strategy", ["none", "forces"])
def test_bf16_within_tolerance_of_fp32_on_device(frames, device, strategy):
    model = _tiny("float32", irreps_node="32x0e+16x1e+8x2e", irreps_head="8x0e+4x1e+2x2e",
                  irreps_feedforward="64x0e+32x1e+16x2e", irreps_feature="32x0e").to(device).train()
    batch = _batch(frames, torch.float32, device, n=4)
    e32, f32, g32 = _step(model, batch, "none")
    with autocast("bf16", device):
        out = ForceRunner(Levers(strategy))(model, batch, training=True)
    assert out["forces"].dtype == torch.float32 and out["energy"].dtype == torch.float64
    model.zero_grad(set_to_none=True)
    loss = (out["energy"] - batch.energy).abs().sum() \
        + 80 * torch.linalg.vector_norm(out["forces"] - batch.forces, dim=-1).mean()
    loss.backward()
    g16 = torch.cat([p.grad.detach().double().cpu().flatten() for p in model.parameters() if p.grad is not None])
    g32 = torch.cat([g.flatten() for g in g32.values()])
    assert torch.isfinite(g16).all()
    assert _rel(out["forces"].detach().double().cpu(), f32) < TOL_BF16[0]
    assert _rel(g16, g32) < TOL_BF16[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_partitions_equal_one_process_on_device(frames, device):
    """P = 2 ranks (gloo; with --device cuda both on the GPU) against one process on the device."""
    z, R = frames
    model = _tiny()
    systems = [C.make_system("aspirin2", [(torch.as_tensor(R[0]), torch.as_tensor(z)),
                                          (torch.as_tensor(R[1]), torch.as_tensor(z))], eval=True),
               C.make_system("aspirin_forces", [(torch.as_tensor(R[2]), torch.as_tensor(z))])]
    ranks = C.run_partitioned([(model, systems[:1]), (model, systems[1:], {"checkpointing": "forces"})], 2,
                              device=str(device))
    ref_model = copy.deepcopy(model).to(device)
    for system in systems:
        e = C.evaluate(C.reference_step(ref_model, system), ranks, system["name"], C.TOLERANCE[torch.float64])
        print(C.describe(system["name"], e, 2))
        assert e["ok"], e


def test_calculator_on_device_equals_cpu(frames, device):
    from ase import Atoms

    from scalable_equiformer.calculator import EquiformerCalculator

    z, R = frames
    model = _tiny().eval()
    atoms = Atoms(numbers=z, positions=R[3])
    atoms.calc = EquiformerCalculator(copy.deepcopy(model), device="cpu")
    e_cpu, f_cpu = atoms.get_potential_energy(), atoms.get_forces()
    calc = EquiformerCalculator(copy.deepcopy(model), device=device)
    assert calc.device.type == device.type
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(e_cpu, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), f_cpu, atol=1e-9)
