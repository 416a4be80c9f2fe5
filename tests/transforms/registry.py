"""One row per transform for the generic harness in ``test_generic.py``.

To add a transform, add a :class:`Case`: a constructor (called under a fixed seed) and, when the
transform's domain is not the whole of R^dim, a sampler of points in the domain. Image transforms
(event_dim 3) give their event ``shape``; tiny images (2×4×4 = 32 numbers) keep the float64
autograd Jacobian cheap. ``identity=True`` marks the transforms whose docstring promises that
they start at the identity.

The harness fails when a transform class exported from :mod:`pyroflows.transforms` has no row
here, and when an exported :class:`~pyroflows.transforms.ElementwiseMap` has no row in each of
:class:`~pyroflows.transforms.Coupling`, :class:`~pyroflows.transforms.MaskedAutoregressive`
and :class:`~pyroflows.transforms.ImageCoupling`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch

from pyroflows.transforms import (
    ActNorm,
    ActNorm2d,
    Additive,
    AdditiveCoupling,
    Affine,
    AffineCoupling,
    Coupling,
    ElementwiseAffine,
    FactorOut,
    FlowTransform,
    ImageAdditiveCoupling,
    ImageAffineCoupling,
    ImageCoupling,
    ImageSigmoid,
    InvConv1x1,
    Inverted,
    LeakyReLU,
    Logit,
    LULinear,
    MaskedAffineAutoregressive,
    MaskedAutoregressive,
    Permutation,
    QRLinear,
    RationalLinearSpline,
    RationalQuadraticSpline,
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
    # Its docstring promises the identity map when freshly built (zero-initialised conditioner
    # or parameters); test_generic checks it before perturbing anything.
    identity: bool = False
    # The scale of the noise ``build`` adds to every parameter. A convolutional conditioner
    # amplifies it about fourfold (its outputs reach ±9 at 0.3): splines fed that are so flat
    # in places (slopes down to 1e-5) that float32 rounding of y moves x by 1e-2 in a round
    # trip, the problem's conditioning rather than an error. Image rows with spline maps take
    # 0.1, which gives conditioner outputs of the size the vector rows get at 0.3.
    perturbation: float = 0.3

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
    "ElementwiseAffine": Case(lambda: ElementwiseAffine(D), identity=True),
    "ActNorm": Case(lambda: ActNorm(D)),
    "LeakyReLU": Case(lambda: LeakyReLU(0.2), sized=False),
    "Sigmoid": Case(lambda: Sigmoid(), sized=False),
    "Logit": Case(lambda: Logit(), sample=unit_interval, sized=False),
    "SinhArcsinh": Case(lambda: SinhArcsinh(D), identity=True),
    "LULinear": Case(lambda: LULinear(D), identity=True),
    "LULinear-rotation": Case(lambda: LULinear(D, init="rotation")),
    "QRLinear": Case(lambda: QRLinear(D), identity=True),
    "Permutation": Case(lambda: Permutation(D)),
    "Reverse": Case(lambda: Reverse(D)),
    "Inverted-MAF": Case(lambda: Inverted(MaskedAffineAutoregressive(D, hidden=H)), identity=True),
    "Inverted-SplineCoupling-context": Case(
        lambda: Inverted(SplineCoupling(D, hidden=H, bins=5, context_dim=3)), context_dim=3
    ),
    # Couplings and autoregressive layers: zero-initialised conditioners, the identity at first.
    "AdditiveCoupling-half": Case(lambda: AdditiveCoupling(D, hidden=H), identity=True),
    "AdditiveCoupling-alternate": Case(
        lambda: AdditiveCoupling(5, hidden=H, mask="alternate"), dim=5, identity=True
    ),
    "AdditiveCoupling-context": Case(
        lambda: AdditiveCoupling(D, hidden=H, context_dim=2), context_dim=2, identity=True
    ),
    "AffineCoupling-half": Case(lambda: AffineCoupling(D, hidden=H), identity=True),
    "AffineCoupling-alternate": Case(
        lambda: AffineCoupling(5, hidden=H, mask="alternate"), dim=5, identity=True
    ),
    "AffineCoupling-explicit": Case(
        lambda: AffineCoupling(D, hidden=H, mask=torch.tensor([False, True, True, False])),
        identity=True,
    ),
    "AffineCoupling-context": Case(
        lambda: AffineCoupling(D, hidden=H, context_dim=3), context_dim=3, identity=True
    ),
    "MAF": Case(lambda: MaskedAffineAutoregressive(D, hidden=H), identity=True),
    "IAF": Case(lambda: MaskedAffineAutoregressive(D, hidden=H, orientation="iaf"), identity=True),
    "MAF-random-order": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, order="random"), identity=True
    ),
    "IAF-explicit-order": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, order=[2, 0, 3, 1], orientation="iaf"),
        identity=True,
    ),
    "MAF-context": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, context_dim=3),
        context_dim=3,
        identity=True,
    ),
    "IAF-context": Case(
        lambda: MaskedAffineAutoregressive(D, hidden=H, context_dim=3, orientation="iaf"),
        context_dim=3,
        identity=True,
    ),
    "MAF-dim1-context": Case(
        lambda: MaskedAffineAutoregressive(1, hidden=H, context_dim=2),
        dim=1,
        context_dim=2,
        identity=True,
    ),
    "SplineCoupling-half": Case(lambda: SplineCoupling(D, hidden=H, bins=5), identity=True),
    "SplineCoupling-alternate-tails": Case(
        lambda: SplineCoupling(5, hidden=H, mask="alternate", bins=4, bound=1.0),
        dim=5,
        identity=True,
    ),
    "SplineCoupling-context": Case(
        lambda: SplineCoupling(D, hidden=H, context_dim=2, bins=5), context_dim=2, identity=True
    ),
    "SplineAutoregressive-maf": Case(
        lambda: SplineAutoregressive(D, hidden=H, bins=5), identity=True
    ),
    "SplineAutoregressive-iaf-tails": Case(
        lambda: SplineAutoregressive(D, hidden=H, orientation="iaf", bins=4, bound=1.0),
        identity=True,
    ),
    "SplineAutoregressive-context": Case(
        lambda: SplineAutoregressive(D, hidden=H, context_dim=2, order="reversed", bins=5),
        context_dim=2,
        identity=True,
    ),
    # The generic transforms with each elementwise map (small bounds put points in the tails).
    "Coupling-Affine": Case(lambda: Coupling(D, Affine(), hidden=H), identity=True),
    "Coupling-Affine-unclamped": Case(
        lambda: Coupling(D, Affine(2.0), hidden=H, conditioner_bound=None), identity=True
    ),
    "Coupling-Additive-alternate": Case(
        lambda: Coupling(5, Additive(), hidden=H, mask="alternate"), dim=5, identity=True
    ),
    "Coupling-RationalQuadraticSpline-context": Case(
        lambda: Coupling(D, RationalQuadraticSpline(4, 2.0), hidden=H, context_dim=2),
        context_dim=2,
        identity=True,
    ),
    "Coupling-RationalLinearSpline": Case(
        lambda: Coupling(D, RationalLinearSpline(4, 2.0), hidden=H), identity=True
    ),
    "Coupling-RationalLinearSpline-alternate-context-tails": Case(
        lambda: Coupling(
            5, RationalLinearSpline(3, 1.0), hidden=H, mask="alternate", context_dim=2
        ),
        dim=5,
        context_dim=2,
        identity=True,
    ),
    "MaskedAutoregressive-Affine-iaf-clamped": Case(
        lambda: MaskedAutoregressive(
            D, Affine(), hidden=H, orientation="iaf", conditioner_bound=1.0
        ),
        identity=True,
    ),
    "MaskedAutoregressive-Additive": Case(
        lambda: MaskedAutoregressive(D, Additive(), hidden=H), identity=True
    ),
    "MaskedAutoregressive-RationalQuadraticSpline-iaf-context": Case(
        lambda: MaskedAutoregressive(
            D, RationalQuadraticSpline(4, 2.0), hidden=H, context_dim=2, orientation="iaf"
        ),
        context_dim=2,
        identity=True,
    ),
    "MaskedAutoregressive-RationalLinearSpline": Case(
        lambda: MaskedAutoregressive(D, RationalLinearSpline(4, 2.0), hidden=H, order="random"),
        identity=True,
    ),
    "MaskedAutoregressive-RationalLinearSpline-iaf-context-tails": Case(
        lambda: MaskedAutoregressive(
            D, RationalLinearSpline(3, 1.0), hidden=H, context_dim=2, orientation="iaf"
        ),
        context_dim=2,
        identity=True,
    ),
    # Image transforms (event_dim 3) on tiny images.
    "Squeeze": Case(lambda: Squeeze(IMG), shape=IMG),
    "ActNorm2d": Case(lambda: ActNorm2d(IMG[0]), shape=IMG, any_size=True),
    "InvConv1x1-lu": Case(lambda: InvConv1x1(IMG[0]), shape=IMG, any_size=True),
    "InvConv1x1-matrix": Case(lambda: InvConv1x1(IMG[0], "matrix"), shape=IMG, any_size=True),
    "ImageAffineCoupling-checkerboard": Case(
        lambda: ImageAffineCoupling(IMG, **CONV), shape=IMG, identity=True
    ),
    "ImageAffineCoupling-checkerboard-flip-context": Case(
        lambda: ImageAffineCoupling(IMG, **CONV, flip=True, context_dim=3),
        shape=IMG,
        context_dim=3,
        identity=True,
    ),
    "ImageAffineCoupling-channel": Case(
        lambda: ImageAffineCoupling(IMG3, **CONV, mask="channel"), shape=IMG3, identity=True
    ),
    "ImageAffineCoupling-channel-flip-context": Case(
        lambda: ImageAffineCoupling(IMG, **CONV, mask="channel", flip=True, context_dim=2),
        shape=IMG,
        context_dim=2,
        identity=True,
    ),
    "ImageAdditiveCoupling-checkerboard": Case(
        lambda: ImageAdditiveCoupling(IMG, **CONV), shape=IMG, identity=True
    ),
    "ImageAdditiveCoupling-channel-flip": Case(
        lambda: ImageAdditiveCoupling(IMG3, **CONV, mask="channel", flip=True),
        shape=IMG3,
        identity=True,
    ),
    "ImageAdditiveCoupling-checkerboard-context": Case(
        lambda: ImageAdditiveCoupling(IMG, **CONV, context_dim=2),
        shape=IMG,
        context_dim=2,
        identity=True,
    ),
    "ImageCoupling-Affine-channel-flip": Case(
        lambda: ImageCoupling(IMG3, Affine(), **CONV, mask="channel", flip=True),
        shape=IMG3,
        identity=True,
    ),
    "ImageCoupling-Additive-checkerboard-context": Case(
        lambda: ImageCoupling(IMG, Additive(), **CONV, context_dim=2),
        shape=IMG,
        context_dim=2,
        identity=True,
    ),
    "ImageCoupling-RationalQuadraticSpline-checkerboard": Case(
        lambda: ImageCoupling(IMG, RationalQuadraticSpline(4, 2.0), **CONV),
        shape=IMG,
        identity=True,
        perturbation=0.1,
    ),
    "ImageCoupling-RationalLinearSpline-checkerboard-flip-context": Case(
        lambda: ImageCoupling(IMG, RationalLinearSpline(4, 2.0), **CONV, flip=True, context_dim=2),
        shape=IMG,
        context_dim=2,
        identity=True,
        perturbation=0.1,
    ),
    "ImageCoupling-RationalLinearSpline-channel-tails": Case(
        lambda: ImageCoupling(IMG3, RationalLinearSpline(3, 1.0), **CONV, mask="channel"),
        shape=IMG3,
        identity=True,
        perturbation=0.1,
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


def fitted_stack(make_layer: Callable[[int], FlowTransform], seed: int, steps: int = 50):
    """Five layers (``make_layer(i)``) with reversals between, fitted to correlated 4-D data by
    ``steps`` Adam steps of maximum likelihood (lr 1e-2, batches of 256), returned in float64
    as a Pyro distribution over a standard Normal base: the setting in which a trained MAF's
    log-density rose again far in the tails."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(4, 4, generator=generator)
    data = torch.randn(2000, 4, generator=generator) @ mixing + 1.0
    layers: list = []
    for i in range(5):
        layers += [Reverse(4), make_layer(i)] if i else [make_layer(i)]
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    optimiser = torch.optim.Adam([p for t in layers for p in t.parameters()], lr=1e-2)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (256,), generator=generator)]
        loss = -dist.TransformedDistribution(base, layers).log_prob(batch).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    base64 = dist.Normal(torch.zeros(4, dtype=torch.float64), 1.0).to_event(1)
    return dist.TransformedDistribution(base64, [t.double() for t in layers])


#: Points far in the tails: radii from 1e2 to 1e7 along the diagonal, the anti-diagonal, an
#: alternating ray and two axes, shape (radii, rays, 4).
TAIL_RADII = torch.logspace(2, 7, 21, dtype=torch.float64)
TAIL_RAYS = torch.tensor(
    [[1.0, 1, 1, 1], [-1, -1, -1, -1], [1, -1, 1, -1], [0, 0, 0, -1], [1, 0, 0, 0]],
    dtype=torch.float64,
)
TAIL_POINTS = TAIL_RADII[:, None, None] * TAIL_RAYS


def rising_rays(d) -> list[int]:
    """The rays along which ``d``'s log-density rises somewhere between radii 1e2 and 1e7."""
    with torch.no_grad():
        log_prob = d.log_prob(TAIL_POINTS)
    assert torch.isfinite(log_prob).all()
    return torch.nonzero((log_prob.diff(dim=0) >= 0).any(0)).flatten().tolist()


# Rows of the families added in 0.5 live beside their own tests (one writer per file).
def _merge() -> None:
    from . import registry_continuous, registry_naf, registry_residual, registry_sylvester

    for module in (registry_naf, registry_sylvester, registry_residual, registry_continuous):
        clash = set(module.CASES) & set(CASES)
        assert not clash, f"registry rows defined twice: {sorted(clash)}"
        CASES.update(module.CASES)


_merge()
