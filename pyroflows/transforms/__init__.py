"""Normalizing-flow building blocks, each a Pyro ``TransformModule``.

The contract they keep is written once, in :class:`FlowTransform`.
"""

from .autoregressive import MaskedAffineAutoregressive
from .base import ConditionedTransform, FlowTransform
from .coupling import AdditiveCoupling, AffineCoupling, coupling_mask
from .elementwise import ActNorm, ElementwiseAffine, LeakyReLU, Logit, Sigmoid, SinhArcsinh
from .image import (
    ActNorm2d,
    ImageAdditiveCoupling,
    ImageAffineCoupling,
    ImageSigmoid,
    InvConv1x1,
    Squeeze,
    image_mask,
)
from .linear import LULinear, Permutation, QRLinear, Reverse
from .multiscale import FactorOut, Squeezed
from .splines import SplineAutoregressive, SplineCoupling, SplineParams, rational_quadratic_spline

__all__ = [
    "ActNorm",
    "ActNorm2d",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionedTransform",
    "ElementwiseAffine",
    "FactorOut",
    "FlowTransform",
    "ImageAdditiveCoupling",
    "ImageAffineCoupling",
    "ImageSigmoid",
    "InvConv1x1",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAffineAutoregressive",
    "Permutation",
    "QRLinear",
    "Reverse",
    "Sigmoid",
    "SinhArcsinh",
    "SplineAutoregressive",
    "SplineCoupling",
    "SplineParams",
    "Squeeze",
    "Squeezed",
    "coupling_mask",
    "image_mask",
    "rational_quadratic_spline",
]
