"""Normalizing-flow building blocks, each a Pyro ``TransformModule``.

The contract they keep is written once, in :class:`FlowTransform`. Coupling, autoregressive and
image-coupling transforms take their elementwise map as an argument (an
:class:`ElementwiseMap`: :class:`Affine`, :class:`Additive`, :class:`RationalQuadraticSpline`,
:class:`RationalLinearSpline`, the neural autoregressive :class:`DSF` and :class:`DDSF`, or one
of your own), e.g. ``Coupling(dim, Affine())``; the named
classes (``AffineCoupling``, ``SplineAutoregressive``, ...) are those with a fixed map.
"""

from . import splines
from .autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive
from .base import ConditionedTransform, FlowTransform, ParameterState, has_inverse
from .continuous import CNF, VelocityField
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, coupling_mask
from .elementwise import ActNorm, ElementwiseAffine, LeakyReLU, Logit, Sigmoid, SinhArcsinh
from .image import (
    ActNorm2d,
    ImageAdditiveCoupling,
    ImageAffineCoupling,
    ImageCoupling,
    ImageSigmoid,
    InvConv1x1,
    Squeeze,
    image_mask,
)
from .inverted import Inverted
from .linear import LULinear, Permutation, QRLinear, Reverse
from .maps import Additive, Affine, ElementwiseMap
from .multiscale import FactorOut, Squeezed
from .naf import BNAF, DDSF, DSF
from .residual import Residual
from .solvers import InverseNotConverged
from .splines import (
    RationalLinearSpline,
    RationalQuadraticSpline,
    SplineAutoregressive,
    SplineCoupling,
    rational_linear_spline,
    rational_quadratic_spline,
)
from .sylvester import Planar, Radial, Sylvester

__all__ = [
    "BNAF",
    "CNF",
    "DDSF",
    "DSF",
    "ActNorm",
    "ActNorm2d",
    "Additive",
    "AdditiveCoupling",
    "Affine",
    "AffineCoupling",
    "ConditionedTransform",
    "Coupling",
    "ElementwiseAffine",
    "ElementwiseMap",
    "FactorOut",
    "FlowTransform",
    "ImageAdditiveCoupling",
    "ImageAffineCoupling",
    "ImageCoupling",
    "ImageSigmoid",
    "InvConv1x1",
    "InverseNotConverged",
    "Inverted",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAffineAutoregressive",
    "MaskedAutoregressive",
    "ParameterState",
    "Permutation",
    "Planar",
    "QRLinear",
    "Radial",
    "RationalLinearSpline",
    "RationalQuadraticSpline",
    "Residual",
    "Reverse",
    "Sigmoid",
    "SinhArcsinh",
    "SplineAutoregressive",
    "SplineCoupling",
    "Squeeze",
    "Squeezed",
    "Sylvester",
    "VelocityField",
    "coupling_mask",
    "has_inverse",
    "image_mask",
    "rational_linear_spline",
    "rational_quadratic_spline",
]


def __getattr__(name: str):
    # Names that changed, with the warning that says what replaced them (PEP 562).
    if name == "SplineParams":
        return splines._spline_params(stacklevel=3)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
