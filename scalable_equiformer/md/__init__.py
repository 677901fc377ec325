"""Molecular dynamics with a trained model, in the engines people simulate molecules with.

* :mod:`.potential` — :class:`Potential`, the inference path every engine calls (eval mode, no
  ``create_graph``, a Verlet neighbour list, elements checked once); Å / eV / eV/Å.
* :mod:`.openmm` — the openmm-ml potential ``"equiformer"`` (``MLPotential("equiformer",
  checkpoint=...)``: ``createSystem``, ``createMixedSystem`` for ML/MM).
* :mod:`.ipi` — an i-PI socket client (UNIX, or TCP with ``TCP_NODELAY``) for NVT and path-integral
  MD (``python -m scalable_equiformer.md.ipi``; :mod:`.ipi_pes` for i-PI's own ``i-pi-py_driver``).
* :mod:`.torchsim` — ``EquiformerModel``, TorchSim's model interface: many molecules in one batch.
* The ASE calculator stays :class:`scalable_equiformer.calculator.EquiformerCalculator`.

The engines are optional: ``pip install '.[md]'`` installs them. The names below are imported on
first use, so that ``import openmmml`` (which loads this package's entry point) stays light.
"""

from .._lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"Potential": "potential", "warn_if_not_smooth": "potential",
                                      "DEFAULT_SKIN": "potential"})

__all__ = ["Potential", "warn_if_not_smooth", "DEFAULT_SKIN"]
