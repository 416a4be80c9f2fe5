"""One row per transform for the generic harness in ``test_generic.py``.

To add a transform, add a :class:`Case`: a constructor (called under a fixed seed) and, when the
transform's domain is not the whole of R^dim, a sampler of points in the domain. Image transforms
(event_dim 3) give their event ``shape``; tiny images (2×4×4 = 32 numbers) keep the float64
autograd Jacobian cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyroflows.transforms import (
    ActNorm,
    ActNorm2d,
    AdditiveCoupling,
    AffineCoupling,
    ElementwiseAffine,
    FactorOut,
    FlowTransform,
    ImageAdditiveCoupling,
    ImageAffineCoupling,
    ImageSigmoid,
    InvConv1x1,
    LeakyReLU,
    Logit,
    LULinear,
    MaskedAffineAutoregressive,
    Permutation,
    QRLinear,
    Reverse,
    Sigmoid,
    SinhArcsinh,
    SplineAutoregressive,
    SplineCoupling,
    Squeeze,
    Squeezed,
)


def normal(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype)


def unit_interval(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return 0.05 + 0.9 * torch.rand(shape, dtype=dtype)


@dataclass(frozen=True)
class Case:
    make: Callable[[], FlowTransform]
    dim: int = 4
    context_dim: int = 0
    sample: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = normal
    # Checks input sizes: a wrong last dimension must raise a ValueError naming the size.
    sized: bool = True
    # The event shape of an image transform (event_dim 3); None for vectors of size ``dim``.
    shape: tuple[int, ...] | None = None
    # For image transforms that accept any height and width: the error names the channels.
    any_size: bool = False

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.shape is None else self.shape

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)


D = 4
H = (8, 8)
IMG = (2, 4, 4)
IMG3 = (3, 2, 4)  # odd channels: the channel mask splits them 1 + 2
CONV = {"channels": 4, "blocks": 1}
CASES: dict[str, Case] = {
    "ElementwiseAffine": Case(lambda: ElementwiseAffine(D)),
    "ActNorm": Case(lambda: ActNorm(D)),
    "LeakyReLU": Case(lambda: LeakyReLU(0.2), sized=False),
    "Sigmoid": Case(lambda: Sigmoid(), sized=False),
    "Logit": Case(lambda: Logit(), sample=unit_interval, sized=False),
    "SinhArcsinh": Case(lambda: SinhArcsinh(D)),
    "LULinear": Case(lambda: LULinear(D)),
    "LULinear-rotation": Case(lambda: LULinear(D, init="rotation")),
    "QRLinear": Case(lambda: QRLinear(D)),
    "Permutation": Case(lambda: Permutation(D)),
    "Reverse": Case(lambda: Reverse(D)),
    "AdditiveCoupling-half": Case(lambda: AdditiveCoupling(D, hidden=H)),
    "AdditiveCoupling-alternate": Case(
        lambda: AdditiveCoupling(5, hidden=H, mask="alternate"), dim=5
    ),
    "AdditiveCoupling-context": Case(
        lambda: AdditiveCoupling(D, hidden=H, context_dim=2), context_dim=2
    ),
    "AffineCoupling-half": Case(lambda: AffineCoupling(D, hidden=H)),
    "AffineCoupling-alternate": Case(lambda: AffineCoupling(5, hidden=H, mask="alternate"), dim=5),
    "AffineCoupling-explicit": Case(
        lambda: AffineCoupling(D, hidden=H, mask=torch.tensor([False, True, True, False]))
    ),
    "AffineCoupling-context": Case(
        lambda: AffineCoupling(D, hidden=H, context_dim=3), context_dim=3
    ),
    "MAF": Case(lambda: MaskedAffineAutoregressive(D, hidden=H)),
    "IAF": Case(lambda: MaskedAffineAutoregressive(D, hidden=H, orientation="iaf")),
    "MAF-random-order": Case(lambda: MaskedAffineAutoregressive(D, hidden=H, order="random")),
    "IAF-explicit-order": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, order=[2, 0, 3, 1], orientation="iaf")
    ),
    "MAF-context": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, context_dim=3), context_dim=3
    ),
    "IAF-context": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, context_dim=3, orientation="iaf"),
        context_dim=3,
    ),
    "MAF-dim1-context": Case(
        lambda: MaskedAffineAutoregressive(1, hidden=H, context_dim=2), dim=1, context_dim=2
    ),
    "SplineCoupling-half": Case(lambda: SplineCoupling(D, hidden=H, bins=5)),
    "SplineCoupling-alternate-tails": Case(
        lambda: SplineCoupling(5, hidden=H, mask="alternate", bins=4, bound=1.0), dim=5
    ),
    "SplineCoupling-context": Case(
        lambda: SplineCoupling(D, hidden=H, context_dim=2, bins=5), context_dim=2
    ),
    "SplineAutoregressive-maf": Case(lambda: SplineAutoregressive(D, hidden=H, bins=5)),
    "SplineAutoregressive-iaf-tails": Case(
        lambda: SplineAutoregressive(D, hidden=H, orientation="iaf", bins=4, bound=1.0)
    ),
    "SplineAutoregressive-context": Case(
        lambda: SplineAutoregressive(D, hidden=H, context_dim=2, order="reversed", bins=5),
        context_dim=2,
    ),
    # Image transforms (event_dim 3) on tiny images.
    "Squeeze": Case(lambda: Squeeze(IMG), shape=IMG),
    "ActNorm2d": Case(lambda: ActNorm2d(IMG[0]), shape=IMG, any_size=True),
    "InvConv1x1-lu": Case(lambda: InvConv1x1(IMG[0]), shape=IMG, any_size=True),
    "InvConv1x1-matrix": Case(lambda: InvConv1x1(IMG[0], "matrix"), shape=IMG, any_size=True),
    "ImageAffineCoupling-checkerboard": Case(lambda: ImageAffineCoupling(IMG, **CONV), shape=IMG),
    "ImageAffineCoupling-checkerboard-flip-context": Case(
        lambda: ImageAffineCoupling(IMG, **CONV, flip=True, context_dim=3),
        shape=IMG,
        context_dim=3,
    ),
    "ImageAffineCoupling-channel": Case(
        lambda: ImageAffineCoupling(IMG3, **CONV, mask="channel"), shape=IMG3
    ),
    "ImageAffineCoupling-channel-flip-context": Case(
        lambda: ImageAffineCoupling(IMG, **CONV, mask="channel", flip=True, context_dim=2),
        shape=IMG,
        context_dim=2,
    ),
    "ImageAdditiveCoupling-checkerboard": Case(
        lambda: ImageAdditiveCoupling(IMG, **CONV), shape=IMG
    ),
    "ImageAdditiveCoupling-channel-flip": Case(
        lambda: ImageAdditiveCoupling(IMG3, **CONV, mask="channel", flip=True), shape=IMG3
    ),
    "ImageAdditiveCoupling-checkerboard-context": Case(
        lambda: ImageAdditiveCoupling(IMG, **CONV, context_dim=2), shape=IMG, context_dim=2
    ),
    "ImageSigmoid": Case(lambda: ImageSigmoid(IMG), shape=IMG),
    "ImageSigmoid-alpha0": Case(lambda: ImageSigmoid(IMG, alpha=0.0), shape=IMG),
    "Squeezed": Case(
        lambda: Squeezed(
            IMG, [ImageAffineCoupling((8, 2, 2), **CONV, mask="channel"), InvConv1x1(8)]
        ),
        shape=IMG,
    ),
    "FactorOut-context": Case(
        lambda: FactorOut(
            IMG3, 1, [ImageAffineCoupling((1, 2, 4), **CONV, context_dim=2)], context_dim=2
        ),
        shape=IMG3,
        context_dim=2,
    ),
}
