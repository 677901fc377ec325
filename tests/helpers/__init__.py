"""Shared test helpers: the equivariance battery (``helpers.equivariance``), the tiny model
(``configs/tiny.yaml``) as a config or as ``--set`` strings, and the tools as modules."""

from __future__ import annotations

from scalable_equiformer.config import ModelConfig
from scalable_equiformer.presets import paper_model_dict, tiny_model_dict

#: the tiny model's irreps (configs/tiny.yaml), and their lmax 3 extension
TINY_IRREPS = {
    2: {k: tiny_model_dict()[k] for k in ("irreps_node", "irreps_head", "irreps_feedforward")},
    3: dict(irreps_node="8x0e+4x1e+2x2e+2x3e", irreps_head="4x0e+2x1e+1x2e+1x3e",
            irreps_feedforward="16x0e+8x1e+4x2e+4x3e"),
}

#: the paper's irreps (configs/presets/md17_l{2,3}.yaml: the original's
#: graph_attention_transformer_nonlinear_exp_l{2,3}_md17)
PAPER_IRREPS = {lmax: {k: paper_model_dict(lmax)[k] for k in ("irreps_node", "irreps_head", "irreps_feedforward")}
                for lmax in (2, 3)}


def tiny_model_config(lmax: int = 2, attention: str = "mlp", message: str = "nonlinear", **overrides) -> ModelConfig:
    """The tiny model (2 blocks, a few channels per l, 2 heads) with cutoff 4 Å, smooth cutoff and
    per-atom normalisation: milliseconds per molecule."""
    kw = dict(
        tiny_model_dict(),
        lmax=lmax,
        cutoff=4.0,
        attention=attention,
        message=message,
        avg_num_neighbors=3.0,
        avg_num_atoms=5.0,
        # the options (not the original's function, which tests/test_original.py checks): the
        # battery's cutoff-continuity check needs the smooth cutoff
        smooth_cutoff=True,
        energy_normalization="per_atom_mean_force_rms",
        **TINY_IRREPS[lmax],
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_sets(width: int = 1, **changes) -> list[str]:
    """The tiny model (``configs/tiny.yaml``, channels times ``width``) as ``model.key=value``
    overrides, with ``changes`` on top."""
    model = {**tiny_model_dict(width), **changes}
    return [f"model.{k}={v}" for k, v in model.items()]


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (tools are scripts, not a package), loaded once per name."""
    import importlib.util
    import sys
    from pathlib import Path

    key = f"tool_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    return sys.modules[key]


def force_loss_batch(atoms: int, dtype=None):
    """Two frames of a synthetic ``atoms``-atom molecule (the second displaced by 0.1 Å noise) with
    random energy and force labels: a batch for comparing the gradients of a force loss."""
    import numpy as np
    import torch

    from scalable_equiformer.profiling import systems
    from scalable_equiformer.profiling.measured_step import make_batch

    dtype = torch.float64 if dtype is None else dtype
    z, pos = systems.synthetic_molecule(atoms)
    frames = np.stack([pos, pos + 0.1 * np.random.default_rng(1).normal(size=pos.shape)])
    batch = make_batch(z, frames, dtype, "cpu")
    g = torch.Generator().manual_seed(2)
    batch.forces = torch.randn(batch.forces.shape, generator=g, dtype=dtype)
    batch.energy = torch.randn(batch.energy.shape, generator=g, dtype=dtype)
    return batch


def bf16_tp_outputs(dtp, implementations, x, sh, w) -> dict:
    """Under CPU bf16 autocast, per implementation of ``dtp``: its output, the gradient of its squared
    sum in the harmonics (kept for a second derivative) and that gradient's squared sum's gradient in
    ``x``, all as float32."""
    import torch

    outs = {}
    for impl in implementations:
        dtp.implementation = impl
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dtp(x, sh, w)
            (gsh,) = torch.autograd.grad(y.float().pow(2).sum(), [sh], create_graph=True)
            (gx,) = torch.autograd.grad(gsh.float().pow(2).sum(), [x])
        outs[impl] = (y.float(), gsh.float(), gx.float())
    return outs


def assert_bf16_close(outs, tol: float = 3e-2) -> None:
    """The first implementation's outputs in ``outs`` (from :func:`bf16_tp_outputs`) finite and within
    ``tol`` (relative to the largest entry) of the second's."""
    import torch

    (a_all, b_all) = list(outs.values())[:2]
    for a, b in zip(a_all, b_all):
        assert torch.isfinite(a).all()
        assert float(((a - b).abs().max() / b.abs().max()).detach()) < tol
