"""One equivariance / invariance battery for every block and every model variant.

Block level: :func:`assert_equivariant` (random rotations acting on each argument through its
irreps; positions transform as ``1o`` vectors).
Model level (anything with the ``model(batch, compute_forces=True)`` contract, including wrapped
or partitioned variants): :func:`check_rotation`, :func:`check_translation`,
:func:`check_permutation`, :func:`check_batch_invariance`, :func:`check_finite_difference_forces`,
:func:`check_cutoff_continuity`, and :func:`run_model_battery` for all of them.

Tolerances (relative to the largest magnitude of the reference): :data:`TOLERANCE`
(fp32 1e-5, fp64 1e-10); finite differences use a 5-point stencil and :data:`FD_TOLERANCE`.
The MD17 models use even-parity irreps for every l, so only proper rotations are tested; pass
``parity=True`` for blocks whose irreps carry parity.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from e3nn import o3
from torch_geometric.data import Batch, Data

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
FD_TOLERANCE = 1e-7  # fp64, 5-point stencil, step 1e-3 Å


@pytest.fixture(autouse=False)
def single_thread():
    """One intra-op thread for one test, restored afterwards. The tests' tensors are tiny, and on a
    shared, oversubscribed 2-core machine OpenMP spin-waiting made a tiny step 50x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def float_dtype(request):
    """The default dtype set for one test, restored afterwards (never set at import time)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(old)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 tol: float | None = None) -> None:
    """``max|actual - expected| <= tol * max(max|expected|, 1)`` with the dtype's tolerance."""
    tol = TOLERANCE[dtype] if tol is None else tol
    actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


def random_rotation(dtype=torch.float64, parity: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random rotation [3, 3] (times -1, an improper one, when ``parity``)."""
    q = torch.randn(4, dtype=torch.float64, generator=generator)
    q = q / q.norm()
    R = o3.quaternion_to_matrix(q)
    if parity:
        R = -R
    return R.to(dtype)


# ---------------------------------------------------------------------------------------------
# Block level


def assert_equivariant(
    fn: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    irreps_args: Sequence,
    irreps_out,
    dtype: torch.dtype,
    parity: bool = False,
    trials: int = 3,
) -> None:
    """``fn(*[D_k(R) a_k]) == D_out(R) fn(*args)`` for random rotations R.

    ``irreps_args[k]`` is an irreps string/object, ``"pos"`` for positions [N, 3] (rotated as
    vectors, ``x @ R^T``) or ``None`` for an argument that does not transform (indices, scalars).
    """
    irreps_out = o3.Irreps(irreps_out)
    out = fn(*args)
    for _ in range(trials):
        R = random_rotation(torch.float64, parity)
        rotated = []
        for a, irreps in zip(args, irreps_args):
            if irreps is None:
                rotated.append(a)
            elif irreps == "pos":
                rotated.append(a @ R.T.to(a.dtype))
            else:
                D = o3.Irreps(irreps).D_from_matrix(R).to(a.dtype)
                rotated.append(a @ D.T)
        out_rot = fn(*rotated)
        D_out = irreps_out.D_from_matrix(R).to(out.dtype)
        assert_close(out_rot, out @ D_out.T, dtype, f"equivariance of {getattr(fn, '__name__', fn)}")


# ---------------------------------------------------------------------------------------------
# Molecules


def make_molecule(num_atoms: int = 6, seed: int = 0, dtype=torch.float64, spread: float = 1.6,
                  zs: Sequence[int] = (1, 6, 7, 8)) -> Data:
    """A random compact molecule: atoms at least 0.9 Å apart, within ~spread * num_atoms^(1/3) Å."""
    g = torch.Generator().manual_seed(seed)
    pos = []
    while len(pos) < num_atoms:
        p = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 2 * spread * num_atoms ** (1 / 3)
        if all(float((p - q).norm()) > 0.9 for q in pos):
            pos.append(p)
    z = torch.tensor([zs[int(i)] for i in torch.randint(len(zs), (num_atoms,), generator=g)], dtype=torch.long)
    return Data(pos=torch.stack(pos).to(dtype), z=z)


def as_batch(*mols: Data) -> Batch:
    return Batch.from_data_list([Data(pos=m.pos.clone(), z=m.z.clone()) for m in mols])


def predict(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch, compute_forces=True)
    return out["energy"].detach(), out["forces"].detach()


# ---------------------------------------------------------------------------------------------
# Model level checks (model in eval mode, dropout off)


def check_rotation(model, mol: Data, dtype, parity: bool = False, trials: int = 2) -> None:
    e0, f0 = predict(model, as_batch(mol))
    for _ in range(trials):
        R = random_rotation(torch.float64, parity).to(mol.pos.dtype)
        rot = Data(pos=mol.pos @ R.T, z=mol.z)
        e1, f1 = predict(model, as_batch(rot))
        assert_close(e1, e0, dtype, "energy invariance under rotation")
        assert_close(f1, f0 @ R.T.to(f0.dtype), dtype, "force equivariance under rotation")


def check_translation(model, mol: Data, dtype) -> None:
    e0, f0 = predict(model, as_batch(mol))
    shifted = Data(pos=mol.pos + torch.tensor([3.1, -7.3, 12.5], dtype=mol.pos.dtype), z=mol.z)
    e1, f1 = predict(model, as_batch(shifted))
    assert_close(e1, e0, dtype, "energy invariance under translation")
    assert_close(f1, f0, dtype, "forces under translation")


def check_permutation(model, mol: Data, dtype, seed: int = 1) -> None:
    e0, f0 = predict(model, as_batch(mol))
    perm = torch.randperm(mol.pos.shape[0], generator=torch.Generator().manual_seed(seed))
    e1, f1 = predict(model, as_batch(Data(pos=mol.pos[perm], z=mol.z[perm])))
    assert_close(e1, e0, dtype, "energy invariance under atom permutation")
    assert_close(f1, f0[perm], dtype, "forces under atom permutation")


def check_batch_invariance(model, mol: Data, others: Sequence[Data], dtype) -> None:
    """A molecule alone equals the same molecule inside a batch (at any position in it)."""
    e0, f0 = predict(model, as_batch(mol))
    batch = as_batch(others[0], mol, *others[1:])
    e1, f1 = predict(model, batch)
    start = others[0].pos.shape[0]
    assert_close(e1[1:2], e0, dtype, "energy of a molecule inside a batch")
    assert_close(f1[start : start + mol.pos.shape[0]], f0, dtype, "forces of a molecule inside a batch")
    order = [others[0], None, *others[1:]]  # graph index -> molecule (None = mol)
    for g, other in enumerate(order):
        if other is not None:
            e_alone, _ = predict(model, as_batch(other))
            assert_close(e1[g : g + 1], e_alone, dtype, f"energy of molecule {g} of the batch")


def _energy(model, mol: Data) -> float:
    return float(model(as_batch(mol), compute_forces=False)["energy"].detach().sum())


def check_finite_difference_forces(model, mol: Data, coords: int = 4, h: float = 1e-3) -> None:
    """fp64: forces equal -dE/dpos by a 5-point central difference on a few coordinates."""
    assert mol.pos.dtype == torch.float64, "finite differences need float64"
    _, f0 = predict(model, as_batch(mol))
    g = torch.Generator().manual_seed(2)
    n = mol.pos.shape[0]
    picks = torch.randperm(n * 3, generator=g)[:coords].tolist()
    fmax = max(float(f0.abs().max()), 1.0)
    for k in picks:
        a, c = divmod(k, 3)
        vals = []
        for step in (-2, -1, 1, 2):
            pos = mol.pos.clone()
            pos[a, c] += step * h
            vals.append(_energy(model, Data(pos=pos, z=mol.z)))
        grad = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
        err = abs(-grad - float(f0[a, c]))
        assert err <= FD_TOLERANCE * fmax, \
            f"force[{a},{c}] {float(f0[a, c]):.10f} vs -dE/dx {-grad:.10f} (error {err:.2e})"


def cutoff_probe(mol: Data, cutoff: float, s: float) -> Data:
    """``mol`` plus one H atom on the ray from the centroid through the outermost atom k, at
    distance ``s`` from k: as s crosses the cutoff, k is the only atom within reach."""
    centroid = mol.pos.mean(0)
    k = int((mol.pos - centroid).norm(dim=1).argmax())
    u = mol.pos[k] - centroid
    u = u / u.norm()
    probe = mol.pos[k] + s * u
    return Data(pos=torch.cat([mol.pos, probe[None]]), z=torch.cat([mol.z, torch.tensor([1])]))


def check_cutoff_continuity(model, mol: Data, cutoff: float, delta: float = 1e-6, tol: float = 1e-9) -> float:
    """fp64: energy and forces barely change as an atom crosses the cutoff of its one neighbour.

    Returns the energy jump. Continuity of a smooth energy gives a jump O(delta^2).
    """
    e_in, f_in = predict(model, as_batch(cutoff_probe(mol, cutoff, cutoff - delta)))
    e_out, f_out = predict(model, as_batch(cutoff_probe(mol, cutoff, cutoff + delta)))
    jump = float((e_in - e_out).abs().max())
    scale = max(float(e_in.abs().max()), 1.0)
    assert jump <= tol * scale, f"energy jumps by {jump:.3e} eV as an atom crosses the cutoff"
    fjump = float((f_in - f_out).abs().max())
    assert fjump <= 1e-4 * max(float(f_in.abs().max()), 1.0), f"forces jump by {fjump:.3e} eV/Å at the cutoff"
    return jump


def run_model_battery(model, dtype, cutoff: float, parity: bool = False) -> None:
    """Every model-level check; finite differences and cutoff continuity only in float64."""
    mol = make_molecule(6, seed=0, dtype=dtype)
    others = [make_molecule(4, seed=5, dtype=dtype), make_molecule(5, seed=6, dtype=dtype)]
    check_rotation(model, mol, dtype, parity=parity)
    check_translation(model, mol, dtype)
    check_permutation(model, mol, dtype)
    check_batch_invariance(model, mol, others, dtype)
    if dtype == torch.float64:
        check_finite_difference_forces(model, mol)
        check_cutoff_continuity(model, make_molecule(4, seed=3, dtype=dtype), cutoff)
