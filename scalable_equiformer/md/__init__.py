"""Molecular dynamics with a trained model, in the engines people simulate molecules with.

* :mod:`.potential` — :class:`Potential`, the inference path every engine calls (eval mode, no
  ``create_graph``, a Verlet neighbour list, elements checked once); Å / eV / eV/Å.
* The ASE calculator stays :class:`scalable_equiformer.calculator.EquiformerCalculator`.

The engines are optional: ``pip install '.[md]'`` installs them.
"""

from .potential import DEFAULT_SKIN, Potential, warn_if_not_smooth

__all__ = ["Potential", "warn_if_not_smooth", "DEFAULT_SKIN"]
