"""Build the Equiformer from the config: ``build_model(config, stats=None) -> Equiformer``.

``config`` is a full ``Config`` (its ``.model`` is used) or a ``ModelConfig`` (any object with
the ``ModelConfig`` attributes). ``stats`` (a ``DatasetStatistics`` of the training split) gives
the energy shift/scale (``model.energy_normalization``, :func:`normalization_constants`) and, where
the config leaves them null, ``avg_num_neighbors`` and ``avg_num_atoms``; a value set in the config
wins over the statistics (the defaults are the original's QM9 constants 15.58 / 18.03). Without
``stats`` the shift is 0 and the scale 1.
"""

from __future__ import annotations

import logging

import torch
from e3nn import o3

from .data.statistics import DatasetStatistics
from .errors import ConfigError
from .nn.attention import ATTENTION_TYPES, MESSAGE_TYPES
from .nn.equiformer import Equiformer
from .nn.radial import RADIAL_BASES

log = logging.getLogger(__name__)

from .runtime import DTYPES as _DTYPES  # noqa: E402 (the one dtype map)


def _irreps(cfg, key: str) -> o3.Irreps:
    value = getattr(cfg, key)
    try:
        return o3.Irreps(value)
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"model.{key}: not an irreps string: {value!r} ({e})") from None


def _choice(cfg, key: str, choices) -> str:
    value = getattr(cfg, key)
    if value not in choices:
        raise ConfigError(f"model.{key}: must be one of {list(choices)}, got {value!r}")
    return value


def _positive(cfg, key: str, integer: bool = False):
    value = getattr(cfg, key)
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"model.{key}: must be an integer, got {value!r}")
    if not value > 0:
        raise ConfigError(f"model.{key}: must be > 0, got {value!r}")
    return value


def _probability(cfg, key: str) -> float:
    value = float(getattr(cfg, key))
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"model.{key}: must be in [0, 1), got {value!r}")
    return value


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
        raise ConfigError("model.energy_normalization=total_mean_std needs the total-energy mean and standard deviation "
                          "of the training split (statistics stored before they existed, or a single training frame); "
                          "use model.energy_normalization=per_atom_mean_force_rms")
    if stats.num_atoms is None:
        raise ConfigError("model.energy_normalization=total_mean_std (the original's) needs training molecules of one "
                          "size; this training split mixes atom counts: use model.energy_normalization=per_atom_mean_force_rms")
    if not stats.energy_std > 0:
        raise ConfigError(f"model.energy_normalization=total_mean_std: the training energies have standard deviation "
                          f"{stats.energy_std} eV; use model.energy_normalization=per_atom_mean_force_rms")
    return stats.energy_mean / stats.num_atoms, stats.energy_std


def build_model(config, stats: DatasetStatistics | None = None) -> Equiformer:
    cfg = getattr(config, "model", config)
    irreps_node = _irreps(cfg, "irreps_node")
    irreps_head = _irreps(cfg, "irreps_head")
    irreps_ffn = _irreps(cfg, "irreps_feedforward")
    irreps_feature = _irreps(cfg, "irreps_feature")
    if any(ir.l != 0 or ir.p != 1 for _, ir in irreps_feature):
        raise ConfigError(f"model.irreps_feature: must be even scalars only (e.g. '512x0e'), got {irreps_feature}")
    lmax = getattr(cfg, "lmax")
    if not isinstance(lmax, int) or lmax < 0:
        raise ConfigError(f"model.lmax: must be an integer >= 0, got {lmax!r}")
    num_blocks = _positive(cfg, "num_blocks", integer=True)
    num_heads = _positive(cfg, "num_heads", integer=True)
    if not any(ir.l == 0 and ir.p == 1 for _, ir in irreps_head) and cfg.attention == "mlp":
        raise ConfigError(f"model.irreps_head: MLP attention needs even scalars in each head, got {irreps_head}")
    num_radial = _positive(cfg, "num_radial", integer=True)
    radial_hidden = list(getattr(cfg, "radial_hidden"))
    if not radial_hidden or any(not isinstance(h, int) or h <= 0 for h in radial_hidden):
        raise ConfigError(f"model.radial_hidden: must be a non-empty list of positive integers, got {radial_hidden!r}")
    cutoff = float(_positive(cfg, "cutoff"))
    max_z = _positive(cfg, "max_atomic_number", integer=True)
    dtype_name = _choice(cfg, "dtype", _DTYPES)

    avg_nb = getattr(cfg, "avg_num_neighbors", None)
    avg_at = getattr(cfg, "avg_num_atoms", None)
    for key, value in (("avg_num_neighbors", avg_nb), ("avg_num_atoms", avg_at)):
        if value is not None and not float(value) > 0:
            raise ConfigError(f"model.{key}: must be > 0 or null, got {value!r}")
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
            irreps_node=irreps_node,
            lmax=lmax,
            num_blocks=num_blocks,
            num_heads=num_heads,
            irreps_head=irreps_head,
            irreps_feedforward=irreps_ffn,
            irreps_feature=irreps_feature,
            num_radial=num_radial,
            radial_basis=_choice(cfg, "radial_basis", RADIAL_BASES),
            radial_hidden=radial_hidden,
            cutoff=cutoff,
            attention=_choice(cfg, "attention", ATTENTION_TYPES),
            message=_choice(cfg, "message", MESSAGE_TYPES),
            alpha_drop=_probability(cfg, "alpha_drop"),
            proj_drop=_probability(cfg, "proj_drop"),
            drop_path=_probability(cfg, "drop_path"),
            max_atomic_number=max_z,
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
    model = model.to(_DTYPES[dtype_name])  # built in float64 (exact constants), then cast
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Equiformer: %d parameters (%.3f M), %s, lmax %d, %d blocks, attention=%s, message=%s, cutoff %.2f Å",
        n_params, n_params / 1e6, dtype_name, lmax, num_blocks, cfg.attention, cfg.message, cutoff,
    )
    log.info(
        "normalisation %s: energy shift %.6f eV/atom, scale %.6f eV (%s); avg_num_neighbors %.4f (%s); avg_num_atoms %.4f (%s); smooth cutoff %s",
        getattr(cfg, "energy_normalization", "per_atom_mean_force_rms"), shift, scale,
        "training split" if stats is not None else "defaults, no statistics given", avg_nb, source_nb, avg_at, source_at,
        "on" if cfg.smooth_cutoff else "off (the original)",
    )
    return model
