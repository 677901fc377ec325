"""Equiformer building blocks; each module has ``irreps_in`` / ``irreps_out``."""

from .attention import GraphAttention, scatter_softmax
from .block import FeedForwardNetwork, TransformerBlock
from .equiformer import EdgeFeatures, Equiformer
from .forces import energy_and_forces
from .gate import Gate
from .norm import EquivariantLayerNorm
from .radial import RadialEmbedding, RadialProfile
from .tensor_product import DepthwiseTensorProduct, EquivariantLinear, SeparableFCTP

__all__ = [
    "DepthwiseTensorProduct",
    "EdgeFeatures",
    "Equiformer",
    "EquivariantLayerNorm",
    "EquivariantLinear",
    "FeedForwardNetwork",
    "Gate",
    "GraphAttention",
    "RadialEmbedding",
    "RadialProfile",
    "SeparableFCTP",
    "TransformerBlock",
    "energy_and_forces",
    "scatter_softmax",
]
