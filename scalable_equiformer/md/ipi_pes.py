"""The potential as a PES of i-PI's own Python driver (``i-pi-py_driver``), for users who launch
their clients that way; :mod:`scalable_equiformer.md.ipi`'s command is the same driver on its own
socket loop.

.. code-block:: bash

    i-pi-py_driver -m custom -P "$(python -c 'import scalable_equiformer.md.ipi_pes as m; print(m.__file__)')" \\
        -u -a equiformer -o template=atat.xyz,checkpoint=runs/x/best.pt

``-o`` takes ``template`` (the structure file of the i-PI input: the atomic numbers),
``checkpoint``, and optionally ``device`` and ``dtype`` (float32 / float64).
"""

__DRIVER_NAME__ = "equiformer"
__DRIVER_CLASS__ = "Equiformer_driver"

from ipi.pes.dummy import Dummy_driver  # noqa: E402

from scalable_equiformer.md.ipi import EquiformerDriver  # noqa: E402  (absolute: i-PI loads this file by path)


class Equiformer_driver(Dummy_driver):
    """i-PI's driver interface (``compute_structure(cell, pos)`` in bohr / hartree) around
    :class:`~scalable_equiformer.md.ipi.EquiformerDriver`."""

    def __init__(self, template, checkpoint, device="auto", dtype=None, *args, **kwargs):
        self.driver = EquiformerDriver.from_files(checkpoint, template, device=device, dtype=dtype or None)
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        return self.driver.compute_structure(cell, pos)
