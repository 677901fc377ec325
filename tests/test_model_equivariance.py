"""The equivariance battery on every attention/message variant at lmax 2 and 3, fp32 and fp64."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from helpers import tiny_model_config
from helpers.equivariance import check_cutoff_continuity, make_molecule, run_model_battery, single_thread  # noqa: F401 (fixture)

from scalable_equiformer import build_model

VARIANTS = [(a, m) for a in ("mlp", "dot") for m in ("nonlinear", "linear")]

pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def _fp64_model(lmax, attention, message, radial_basis="exp_normal"):
    torch.manual_seed(0)
    cfg = tiny_model_config(lmax, attention, message, dtype="float64", radial_basis=radial_basis)
    return build_model(cfg).eval(), cfg


def _model(lmax, attention, message, dtype, radial_basis="exp_normal"):
    """The fp64 model, or an fp32 copy of it (building e3nn tensor products costs ~1 s each)."""
    model, cfg = _fp64_model(lmax, attention, message, radial_basis)
    if dtype == torch.float32:
        model = copy.deepcopy(model).to(torch.float32)
    return model, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("attention,message", VARIANTS)
@pytest.mark.parametrize("lmax", [2, 3])
def test_battery(lmax, attention, message, dtype):
    model, cfg = _model(lmax, attention, message, dtype)
    run_model_battery(model, dtype, cfg.cutoff)


@pytest.mark.parametrize("basis", ["gaussian", "bessel"])
def test_battery_other_radial_bases(basis):
    model, cfg = _model(2, "mlp", "nonlinear", torch.float64, basis)
    run_model_battery(model, torch.float64, cfg.cutoff)


def test_cutoff_check_detects_the_original_discontinuity():
    """Without the smooth attention weighting (the original's plain softmax) the energy jumps at
    the cutoff: the continuity check must see it (it is not vacuous)."""
    model, cfg = _model(2, "mlp", "nonlinear", torch.float64)
    model_plain = copy.deepcopy(model)
    for m in model_plain.modules():
        if hasattr(m, "smooth"):
            m.smooth = False
    mol = make_molecule(4, seed=3, dtype=torch.float64)
    check_cutoff_continuity(model, mol, cfg.cutoff)
    with pytest.raises(AssertionError, match="jumps"):
        check_cutoff_continuity(model_plain, mol, cfg.cutoff)
