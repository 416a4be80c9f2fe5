"""Normalizing-flow building blocks, each a Pyro ``TransformModule``.

The contract they keep is written once, in :class:`FlowTransform`.
"""

from .base import ConditionedTransform, FlowTransform
from .coupling import AdditiveCoupling, AffineCoupling, coupling_mask
from .elementwise import ActNorm, ElementwiseAffine, LeakyReLU, Logit, Sigmoid, SinhArcsinh
from .linear import LULinear, Permutation, QRLinear, Reverse

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionedTransform",
    "ElementwiseAffine",
    "FlowTransform",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "Permutation",
    "QRLinear",
    "Reverse",
    "Sigmoid",
    "SinhArcsinh",
    "coupling_mask",
]
