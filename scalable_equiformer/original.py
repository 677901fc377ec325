"""Checkpoints of the original Equiformer code (atomicarchitects/equiformer) mapped onto this model.

The original's MD17 training script saves ``{"state_dict": model.state_dict()}`` as ``*.pth.tar``
(EMA copies too, sometimes with a ``module.`` prefix). :func:`map_original_state` turns such a state
dict into this project's ``Equiformer`` state dict, for a model built from a config with the
original's function (``configs/md17_*``: no smooth cutoff, the original's QM9 constants,
``energy_normalization: total_mean_std``):

* names: the original's ``LinearRS`` keep their weight in ``<name>.tp.weight`` and bias in
  ``<name>.bias.0`` (here ``<name>.weight`` / ``<name>.bias``); ``rbf`` is ``radial.basis``;
  ``sep_act.dtp_rad`` is ``sep_act.rad``; the final ``norm`` and ``head.0`` / ``head.2`` are
  ``head.norm`` / ``head.lin_1`` / ``head.lin_2``. Derived constants (``output_mask``, the gates'
  weightless ``mul`` products, e3nn's Clebsch-Gordan buffers) are not weights and are not copied.
* the Clebsch-Gordan sign convention: e3nn 0.5 changed the sign of some Wigner-3j symbols (for
  l <= 2: (1,2,2), (2,1,2), (2,2,1)). The original pins e3nn 0.4.4 and its tensor products save
  their symbols as buffers (``..._compiled_main_left_right._w3j_<l1>_<l2>_<l3>``); each depth-wise
  tensor product's path whose symbol in the file is the negative of this e3nn's gets its weights
  negated (the rows of the radial network's last layer and offset, or the internal weights), so
  the imported model computes the same function. The convention is read from the file, per path.

Anything that does not map (another architecture, a missing or extra tensor, a shape mismatch, a
symbol that matches neither sign) is a one-line :class:`~scalable_equiformer.errors.CheckpointError`:
never a partial load.

The original's outputs are normalised: ``E = energy * std + mean`` with ``mean`` / ``std`` the mean
and standard deviation of the training split's total energies (not stored in its checkpoints).
:func:`statistics_for_import` makes the :class:`DatasetStatistics` that give this model the same
normalisation, in eV.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from e3nn import o3

from .checkpoint_io import non_finite_tensor
from .data.statistics import DatasetStatistics
from .errors import CheckpointError
from .nn.tensor_product import DepthwiseTensorProduct

#: the original's rescaling constants (average neighbours and atoms, computed on QM9)
ORIGINAL_AVG_NUM_NEIGHBORS = 15.57930850982666
ORIGINAL_AVG_NUM_ATOMS = 18.03065905448718

# original name -> this project's name (applied in order, each at most once)
_RENAMES = (
    (re.compile(r"^atom_embed\.atom_type_lin\."), "atom_embed.lin."),
    (re.compile(r"^rbf\."), "radial.basis."),
    (re.compile(r"\.sep_act\.dtp_rad\."), ".sep_act.rad."),
    (re.compile(r"^norm\."), "head.norm."),
    (re.compile(r"^head\.0\."), "head.lin_1."),
    (re.compile(r"^head\.2\."), "head.lin_2."),
    (re.compile(r"\.bias\.0$"), ".bias"),
)
_W3J = re.compile(r"\._compiled_main_left_right\._w3j_(\d+)_(\d+)_(\d+)$")
# derived constants of the original's modules: not weights
_DERIVED = (re.compile(r"\.output_mask$"), re.compile(r"\.gate\.mul\.weight$"), _W3J)


def read_original_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict of an original ``*.pth.tar`` (``{"state_dict": ...}`` or a bare state dict),
    ``module.`` prefixes (DDP, EMA wrappers) removed, float64. One-line CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: holds objects other than tensors: refused "
                                  "(only plain state dicts are read)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {first[:160]}") from None
    state = obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
    tensors = isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    if not tensors or not state:
        raise CheckpointError(f"{path}: not an original Equiformer checkpoint "
                              "(expected a dict with a 'state_dict' of tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = non_finite_tensor(state)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values")
    return {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in state.items()}


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key, count=1)
    return key


def original_parameter_name(key: str, model: torch.nn.Module) -> str:
    """This model's name for the original's tensor ``key`` (KeyError if it has none)."""
    ours = model.state_dict()
    new = _rename(key)
    if new not in ours and new.endswith(".tp.weight") and new[: -len(".tp.weight")] + ".weight" in ours:
        new = new[: -len(".tp.weight")] + ".weight"  # LinearRS: the weight of its tensor product
    if new not in ours:
        raise KeyError(key)
    return new


def _path_signs(dtp: DepthwiseTensorProduct, name: str, original: dict, path) -> list[int]:
    """+1/-1 per instruction of ``dtp``: the sign of the file's Wigner-3j symbol against this e3nn's."""
    signs = []
    for ins in dtp.tp.instructions:
        l1 = dtp.irreps_in[ins.i_in1].ir.l
        l2 = dtp.irreps_edge[ins.i_in2].ir.l
        l3 = dtp.irreps_out[ins.i_out].ir.l
        if 0 in (l1, l2, l3):
            signs.append(1)  # delta / sqrt(2l+1) in every e3nn version (e3nn's code keeps no buffer for it)
            continue
        key = f"{name}.tp._compiled_main_left_right._w3j_{l1}_{l2}_{l3}"
        if key not in original:
            raise CheckpointError(f"{path}: no Clebsch-Gordan buffer {key}: cannot tell the sign convention "
                                  "the checkpoint was trained under")
        saved = original[key]
        ours = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        if saved.shape != ours.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(saved.shape)}, expected {tuple(ours.shape)}")
        if torch.allclose(saved, ours, atol=1e-6):
            signs.append(1)
        elif torch.allclose(saved, -ours, atol=1e-6):
            signs.append(-1)
        else:
            raise CheckpointError(f"{path}: Clebsch-Gordan coefficients {key} match neither sign of this e3nn's: "
                                  "another basis convention, refused")
    return signs


def _weight_rows(dtp: DepthwiseTensorProduct) -> list[slice]:
    """The slice of the flat per-path weight vector that belongs to each instruction (e3nn's layout)."""
    out, start = [], 0
    for ins in dtp.tp.instructions:
        n = 1
        for d in ins.path_shape:
            n *= d
        out.append(slice(start, start + n))
        start += n
    return out


def map_original_state(original: dict[str, torch.Tensor], model: torch.nn.Module,
                       path="checkpoint") -> dict[str, torch.Tensor]:
    """This model's full state dict with the original's weights (see the module docstring).

    ``model`` must have the original's architecture (the config's irreps, blocks, heads, radial
    sizes); its own buffers (statistics, derived constants) are kept. Raises a one-line
    CheckpointError naming the first tensors that do not map.
    """
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in original.items():
        if any(p.search(key) for p in _DERIVED):
            continue
        try:
            new = original_parameter_name(key, model)
        except KeyError:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(ours[new].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} but this model's {new} has "
                                  f"{tuple(ours[new].shape)}: another architecture (check the --config)")
        mapped[new] = value
    own_buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in ours if k not in mapped and k not in own_buffers and not k.endswith(".tp.weight")]
    missing += [k for k in ours if k.endswith(".tp.weight") and ours[k].numel() and k not in mapped]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of this model missing from the file "
                         f"(first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) of the file that this model has no place for "
                         f"(first: {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path}: does not map onto this model: {'; '.join(parts)} "
                              "(another architecture? check the --config)")
    _apply_path_signs(model, original, mapped, path)
    state = {k: v.detach().clone() for k, v in ours.items()}
    for key, value in mapped.items():
        state[key] = value.to(dtype=state[key].dtype)
    return state


def _apply_path_signs(model: torch.nn.Module, original: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor],
                      path) -> None:
    """The Clebsch-Gordan sign convention, per depth-wise tensor product and path: the weights in
    ``mapped`` (this model's names) of each path whose sign differs are negated (new tensors)."""
    for name, module in model.named_modules():
        if not isinstance(module, DepthwiseTensorProduct):
            continue
        signs = _path_signs(module, name, original, path)
        if all(s == 1 for s in signs):
            continue
        rows = _weight_rows(module)
        if module.internal_weights:
            targets = [(f"{name}.tp.weight", 0)]
        else:
            parent = name.rsplit(".", 1)[0]
            last = len(getattr(model.get_submodule(parent), "rad").net) - 1
            targets = [(f"{parent}.rad.net.{last}.weight", 0), (f"{parent}.rad.offset", 0)]
        for key, dim in targets:
            t = mapped[key].clone()
            for sign, sl in zip(signs, rows):
                if sign < 0:
                    t.narrow(dim, sl.start, sl.stop - sl.start).neg_()
            mapped[key] = t


def statistics_for_import(energy_mean: float, energy_std: float, num_atoms: int, force_rms: float | None = None,
                          avg_num_neighbors: float = ORIGINAL_AVG_NUM_NEIGHBORS,
                          avg_num_atoms: float = ORIGINAL_AVG_NUM_ATOMS) -> DatasetStatistics:
    """Statistics (eV) that reproduce the original's de-normalisation ``E = out * std + mean``."""
    if not energy_std > 0:
        raise CheckpointError(f"energy standard deviation must be > 0, got {energy_std}")
    return DatasetStatistics(
        energy_per_atom_mean=energy_mean / num_atoms,
        force_rms=force_rms if force_rms is not None else energy_std,
        avg_num_neighbors=avg_num_neighbors,
        avg_num_atoms=avg_num_atoms,
        energy_mean=energy_mean,
        energy_std=energy_std,
        num_atoms=int(num_atoms),
    )


__all__ = ["ORIGINAL_AVG_NUM_NEIGHBORS", "ORIGINAL_AVG_NUM_ATOMS", "read_original_checkpoint", "map_original_state",
           "original_parameter_name",
           "statistics_for_import"]


def import_original(path, config, energy_mean: float, energy_std: float, num_atoms: int,
                    force_rms: float | None = None):
    """``(model, stats)``: this project's model built from ``config`` (the original's architecture and
    function) with the weights of the original checkpoint ``path``; energies in eV.

    ``energy_mean`` / ``energy_std`` (eV) are the original run's target normalisation (mean and
    standard deviation of its training split's total energies); ``num_atoms`` the molecule's atom count.
    """
    from . import runtime
    from .model import build_model

    m = config.model
    if m.energy_normalization != "total_mean_std" or m.smooth_cutoff:
        raise CheckpointError(f"{path}: the config must have the original's function to import it "
                              f"(model.energy_normalization=total_mean_std, model.smooth_cutoff=false; got "
                              f"{m.energy_normalization}, smooth_cutoff={m.smooth_cutoff}): "
                              "use a configs/md17_* config")
    original = read_original_checkpoint(path)
    stats = statistics_for_import(energy_mean, energy_std, num_atoms, force_rms,
                                  avg_num_neighbors=m.avg_num_neighbors or ORIGINAL_AVG_NUM_NEIGHBORS,
                                  avg_num_atoms=m.avg_num_atoms or ORIGINAL_AVG_NUM_ATOMS)
    with runtime.default_dtype(m.dtype):
        model = build_model(config, stats)
    state = map_original_state(original, model, path)
    model.load_state_dict(state)
    return model.eval(), stats


def imported_payload(model, config, stats: DatasetStatistics, source: dict, elements=None) -> dict:
    """A checkpoint payload (``training.checkpoint.save_checkpoint``) that ``load_model``, the
    calculator, ``tools/evaluate.py`` and ``train.init_from`` read. ``source`` says where it came
    from; ``elements`` (atomic numbers of the original's training data, or None = unknown) lets the
    calculator and ``evaluate.py`` refuse elements the model never saw."""
    from .checkpoint_io import clean_state, normalise_elements

    return {
        "config": config.to_dict(),
        "stats": stats.to_dict(),
        "model": clean_state(model.state_dict()),
        "ema": None,
        "epoch": None,
        "step": None,
        "metrics": None,
        "imported_from": dict(source),
        "elements": normalise_elements(elements),
    }


__all__ += ["import_original", "imported_payload"]
