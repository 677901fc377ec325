"""Build the Equiformer from the config: ``build_model(config, stats=None) -> Equiformer``.

``config`` is a full ``Config`` (its ``.model`` is used) or a ``ModelConfig`` (any object with
the ``ModelConfig`` attributes). ``stats`` (a ``DatasetStatistics`` of the training split) gives
the energy shift/scale (``model.energy_normalization``, :func:`normalization_constants`) and, where
the config leaves them null, ``avg_num_neighbors`` and ``avg_num_atoms``; a value set in the config
wins over the statistics (the defaults are the original's QM9 constants 15.58 / 18.03). Without
``stats`` the shift is 0 and the scale 1.

The model section is validated here by the config's own rules (``config.ModelConfig.validate``,
through :func:`config.validate_section`): a ModelConfig built in Python gets the checks that
``load_config`` runs, from the one copy; the builder and ``nn/`` trust what passes.

The model carries no memory lever: ``model(batch)`` is plain autograd, and the levers are run by
a ``memory.ForceRunner`` built from ``config.memory`` (training, the profiler).
"""

from __future__ import annotations

import logging

import torch
from .data.statistics import DatasetStatistics
from .config import validate_section
from .errors import ConfigError
from .nn.equiformer import Equiformer
from .nn.tensor_product import set_tensor_product

log = logging.getLogger(__name__)

from .runtime import DTYPES as _DTYPES  # noqa: E402 (the one dtype map)

def normalization_constants(config, stats: DatasetStatistics | None) -> tuple[float, float]:
    """``(energy_shift eV/atom, energy_scale eV)`` of ``model.energy_normalization``; (0, 1) without stats.

    * ``total_mean_std`` (the original): ``E = std * out + mean``, ``mean``/``std`` of the training
      split's total energies; as a per-atom shift ``mean / n_atoms``, so the training molecules must
      all have one atom count (MD17, MD22: one molecule per dataset).
    * ``per_atom_mean_force_rms``: ``E = force_rms * out + n_atoms * (mean energy per atom)``.

    ``out`` is the head's sum over atoms divided by ``sqrt(avg_num_atoms)``. The energy scale is also
    the loss divisor (``training.loss``), so loss and gradients are the original's with ``total_mean_std``.
    """
    cfg = getattr(config, "model", config)
    if stats is None:
        return 0.0, 1.0
    kind = getattr(cfg, "energy_normalization", "per_atom_mean_force_rms")
    if kind == "per_atom_mean_force_rms":
        return stats.energy_per_atom_mean, stats.force_rms
    if stats.energy_mean is None or stats.energy_std is None:
        raise ConfigError("model.energy_normalization=total_mean_std needs the total-energy mean and standard "
                          "deviation of the training split (statistics stored before they existed, or a single "
                          "training frame); use model.energy_normalization=per_atom_mean_force_rms")
    if stats.num_atoms is None:
        raise ConfigError("model.energy_normalization=total_mean_std (the original's) needs training molecules of one "
                          "size; this training split mixes atom counts: "
                          "use model.energy_normalization=per_atom_mean_force_rms")
    if not stats.energy_std > 0:
        raise ConfigError(f"model.energy_normalization=total_mean_std: the training energies have standard deviation "
                          f"{stats.energy_std} eV; use model.energy_normalization=per_atom_mean_force_rms")
    return stats.energy_mean / stats.num_atoms, stats.energy_std


def build_model(config, stats: DatasetStatistics | None = None) -> Equiformer:
    cfg = getattr(config, "model", config)
    validate_section(cfg, "model")  # the rules of config.ModelConfig.validate: one copy
    avg_nb, avg_at = cfg.avg_num_neighbors, cfg.avg_num_atoms
    if (avg_nb is None or avg_at is None) and stats is None:
        raise ConfigError(
            "model.avg_num_neighbors / model.avg_num_atoms are null and no training-split statistics were given: "
            "pass build_model(config, stats=compute_statistics(train_split, cutoff)) or set both in the config"
        )
    source_nb = "config" if avg_nb is not None else "training split"
    source_at = "config" if avg_at is not None else "training split"
    avg_nb = float(avg_nb) if avg_nb is not None else stats.avg_num_neighbors
    avg_at = float(avg_at) if avg_at is not None else stats.avg_num_atoms
    shift, scale = normalization_constants(cfg, stats)

    old_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its Clebsch-Gordan constants in the default dtype
    try:
        model = Equiformer(
            irreps_node=cfg.irreps_node,
            lmax=cfg.lmax,
            num_blocks=cfg.num_blocks,
            num_heads=cfg.num_heads,
            irreps_head=cfg.irreps_head,
            irreps_feedforward=cfg.irreps_feedforward,
            irreps_feature=cfg.irreps_feature,
            num_radial=cfg.num_radial,
            radial_basis=cfg.radial_basis,
            radial_hidden=list(cfg.radial_hidden),
            cutoff=float(cfg.cutoff),
            attention=cfg.attention,
            message=cfg.message,
            alpha_drop=float(cfg.alpha_drop),
            proj_drop=float(cfg.proj_drop),
            drop_path=float(cfg.drop_path),
            max_atomic_number=cfg.max_atomic_number,
            avg_num_neighbors=avg_nb,
            avg_num_atoms=avg_at,
            energy_shift=shift,
            energy_scale=scale,
            smooth_cutoff=bool(cfg.smooth_cutoff),
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    finally:
        torch.set_default_dtype(old_default)
    model = model.to(_DTYPES[cfg.dtype])  # built in float64 (exact constants), then cast
    set_tensor_product(model, getattr(cfg, "tensor_product", "fast"))  # every depth-wise TP; validated above
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Equiformer: %d parameters (%.3f M), %s, lmax %d, %d blocks, attention=%s, message=%s, cutoff %.2f Å, "
        "tensor products %s",
        n_params, n_params / 1e6, cfg.dtype, cfg.lmax, cfg.num_blocks, cfg.attention, cfg.message, cfg.cutoff,
        getattr(cfg, "tensor_product", "fast"),
    )
    log.info(
        "normalisation %s: energy shift %.6f eV/atom, scale %.6f eV (%s); avg_num_neighbors %.4f (%s); "
        "avg_num_atoms %.4f (%s); smooth cutoff %s",
        getattr(cfg, "energy_normalization", "per_atom_mean_force_rms"), shift, scale,
        "training split" if stats is not None else "defaults, no statistics given",
        avg_nb, source_nb, avg_at, source_at,
        "on" if cfg.smooth_cutoff else "off (the original)",
    )
    return model
