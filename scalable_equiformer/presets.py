"""The model presets the tests, tools and benchmarks start from, read from the shipped configs (one
copy of each model): :func:`tiny_model_dict` is ``configs/tiny.yaml``'s model (a few thousand
parameters, every stage of the paper's model), :func:`paper_model_dict` the paper's MD17 model
(``configs/presets/md17_l{2,3}.yaml``, 3.50 M / 5.50 M parameters)."""

from __future__ import annotations

import re

from .config_text import config_section

#: the model keys whose channel counts ``width`` multiplies
_IRREPS_KEYS = ("irreps_node", "irreps_head", "irreps_feedforward", "irreps_feature")


def tiny_model_dict(width: int = 1) -> dict:
    """The model section of ``configs/tiny.yaml``, the project's one tiny model; ``width``
    multiplies every channel count (``width=2``: ``16x0e+8x1e+4x2e`` nodes)."""
    model = config_section("tiny", "model")
    if width != 1:
        for key in _IRREPS_KEYS:
            model[key] = re.sub(r"(\d+)x", lambda m: f"{int(m.group(1)) * width}x", model[key])
    return model


def paper_model_dict(lmax: int = 2) -> dict:
    """The model section of the paper's MD17 recipe at ``lmax`` 2 or 3 (``configs/presets/md17_l*.yaml``)."""
    return config_section(f"presets/md17_l{lmax}", "model")


__all__ = ["paper_model_dict", "tiny_model_dict"]
