"""Flows: a base distribution and a stack of transforms, called to give a Pyro distribution.

``flow()`` (or ``flow(context)``) returns a :class:`~pyroflows.distribution.FlowDistribution`,
a ``pyro.distributions.TransformedDistribution`` with ``log_prob``, ``sample`` and ``rsample``.
It scores its own samples without inverting anything and without a second conditioner pass,
and it may be kept across optimiser steps: it reads its base at use and its caches are keyed on
the parameters' state (see :mod:`pyroflows.distribution`). The builders here (``NICE``,
``RealNVP``, ``MAF``, ``IAF``, ``NSF``, ``LinearFlow``, ``Glow``, ``ImageRealNVP``) record an
explicit configuration, and :data:`BUILDERS` names them for the command line,
``AutoFlowGuide(flow=NAME)`` and :func:`pyroflows.load`.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import nn
from torch.distributions import Transform
from torch.distributions.transforms import _InverseTransform

from ._checks import check_nonnegative_int, check_positive_int
from .bases import _event_shape, make_base
from .distribution import FlowDistribution
from .transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ElementwiseAffine,
    LeakyReLU,
    LULinear,
    Permutation,
    QRLinear,
    Reverse,
    SinhArcsinh,
    coupling_mask,
)
from .transforms.autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive
from .transforms.base import FlowTransform, check_context
from .transforms.continuous import CNF as CNFTransform
from .transforms.image import (
    ActNorm2d,
    ImageAffineCoupling,
    ImageSigmoid,
    InvConv1x1,
    _check_shape,
)
from .transforms.inverted import Inverted
from .transforms.multiscale import FactorOut, Squeezed
from .transforms.naf import BNAF as BNAFTransform
from .transforms.naf import DDSF, DSF
from .transforms.residual import Residual
from .transforms.splines import SplineAutoregressive, SplineCoupling
from .transforms.sylvester import Planar, Radial, Sylvester

__all__ = [
    "BNAF",
    "BUILDERS",
    "CNF",
    "IAF",
    "MAF",
    "NAF",
    "NICE",
    "NSF",
    "Flow",
    "FlowDistribution",
    "Glow",
    "ImageRealNVP",
    "LinearFlow",
    "RealNVP",
    "ResidualFlow",
    "SylvesterFlow",
    "builder_name",
    "register_builder",
    "unregister_builder",
    "vector_builders",
]

MIXINGS = ("reverse", "random", "lu", "qr", None)


class Flow(nn.Module):
    """A normalizing flow: a base distribution and transforms, base side first.

    Calling the flow returns a Pyro ``TransformedDistribution`` over ``R^dim``: ``flow()`` for an
    unconditional flow, ``flow(context)`` with a context of shape ``(*batch, context_dim)`` for a
    conditional one, whose distribution then has ``batch_shape == context.shape[:-1]`` (so it
    works inside ``pyro.plate``). The base lives in buffers or parameters of the module, so
    ``.to("cuda")``, ``.double()`` and ``state_dict`` cover everything.

    Args:
        transforms: transforms applied in order to base samples (the last one produces data).
            Transforms that are ``nn.Module``\\ s, and the modules behind inverses ``m.inv``, are
            registered (``pyro.module`` and ``.parameters()`` reach them); conditional ones are
            bound with ``condition(context)`` on each call.
        dim: number of features, or the event shape of a flow over tensors (``(C, H, W)`` for
            images, see :class:`Glow`): then ``flow.event_shape`` is that shape and
            ``flow.dim`` the number of entries.
        context_dim: size of the context, 0 for an unconditional flow.
        base: ``"normal"`` (standard Normal, the default), ``"diag_normal"`` (learnable
            diagonal Normal), ``"conditional_normal"`` (a diagonal Normal whose mean and scale a
            network reads from the context) or a module mapping a context (or ``None``) to a
            distribution with event shape ``(dim,)``.
        base_hidden: hidden widths of the ``"conditional_normal"`` network.
        config: the keyword arguments of the subclass's constructor that rebuild this flow
            (builders pass theirs; see :attr:`config`). ``None`` for a flow assembled by hand,
            which :func:`pyroflows.save` refuses.

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> from pyroflows.transforms import AffineCoupling, Reverse
        >>> flow = pf.Flow([AffineCoupling(2, hidden=(16,)), Reverse(2)], dim=2)
        >>> d = flow()
        >>> d.sample((5,)).shape, d.log_prob(torch.zeros(3, 2)).shape
        (torch.Size([5, 2]), torch.Size([3]))
    """

    #: ``True`` for builders whose first argument is an image shape ``(C, H, W)`` rather than
    #: ``dim`` (:class:`Glow`, :class:`ImageRealNVP`): the command line and
    #: ``AutoFlowGuide(flow=NAME)`` offer the others (:func:`vector_builders`).
    image_builder: ClassVar[bool] = False

    def __init__(
        self,
        transforms: Sequence[Transform],
        dim: int | Sequence[int],
        context_dim: int = 0,
        base: str | nn.Module = "normal",
        base_hidden: Sequence[int] = (64,),
        *,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        shape = _event_shape(dim)
        check_nonnegative_int("context_dim", context_dim)
        for t in transforms:
            if not isinstance(t, (Transform, ConditionalTransform)):
                raise TypeError(f"transforms: expected Pyro/torch transforms; got {type(t)}")
        #: the shape of one event, ``(dim,)`` for vectors, e.g. ``(C, H, W)`` for images
        self.event_shape = shape
        #: the number of entries of one event
        self.dim = math.prod(shape)
        self.context_dim = context_dim
        self.base = make_base(base, dim if len(shape) > 1 else shape[0], context_dim, base_hidden)
        modules = [m for m in map(_module_of, transforms) if m is not None]
        self.transforms = nn.ModuleList(modules)
        self._chain = list(transforms)
        # Every layer a pyroflows transform that keeps the event shape: the distribution's
        # fast paths apply.
        self._simple = all(
            isinstance(t, FlowTransform)
            and t.domain.event_dim == t.codomain.event_dim == len(shape)
            and tuple(t.forward_shape(shape)) == shape
            for t in self._chain
        )
        self._config_kwargs = None if config is None else dict(config)

    @property
    def config(self) -> dict[str, Any] | None:
        """The builder's name in :data:`BUILDERS` and the arguments that rebuild this flow.

        ``{"builder": NAME, "kwargs": {...}}``, where ``BUILDERS[NAME](**kwargs)`` builds the same
        architecture (:func:`pyroflows.save` writes it as JSON). ``NAME`` is ``None`` when the
        flow's class is not registered (see :func:`register_builder`); the whole config is
        ``None`` for a flow assembled by hand from transforms.

        Example:
            >>> import pyroflows as pf
            >>> config = pf.MAF(2, layers=2, hidden=(8,)).config
            >>> config["builder"], config["kwargs"]["layers"]
            ('maf', 2)
        """
        kwargs = getattr(self, "_config_kwargs", None)
        if kwargs is None:
            return None
        return {"builder": builder_name(type(self)), "kwargs": dict(kwargs)}

    def set_config(self, **kwargs: Any) -> None:
        """Record the constructor arguments that rebuild this flow (its :attr:`config`).

        Builders record theirs by passing ``config=`` to :class:`Flow`. A subclass of a builder
        whose constructor takes other arguments calls this at the end of its ``__init__`` with
        its own arguments, so that :func:`pyroflows.save` writes what ``type(self)(**kwargs)``
        needs (see :func:`register_builder` for an example).

        Args:
            **kwargs: keyword arguments of ``type(self)``'s constructor.
        """
        self._config_kwargs = dict(kwargs)

    def forward(
        self, context: torch.Tensor | None = None, *, temperature: float = 1.0
    ) -> dist.TransformedDistribution:
        """The flow's distribution (for ``context``, when the flow is conditional).

        Args:
            context: ``None`` for an unconditional flow; a tensor of shape
                ``(*batch, context_dim)`` for a conditional one.
            temperature: multiplies the scale of the (Normal) base distribution, as Glow samples
                "at temperature T": ``flow(temperature=0.7).sample((16,))`` gives cleaner, less
                varied images. The tempered distribution is exact (its ``log_prob`` is that of
                the tempered base pushed through the same transforms). See
                :func:`pyroflows.bases.tempered`.

        Returns:
            A :class:`FlowDistribution` (a ``pyro.distributions.TransformedDistribution``) with
            event shape ``(dim,)`` and batch shape ``context.shape[:-1]`` (``()`` without a
            context).

        Example:
            >>> import torch, pyroflows as pf
            >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(8,))
            >>> flow(temperature=0.5).sample((4,)).shape
            torch.Size([4, 2])
        """
        return FlowDistribution.from_flow(self, self._check_context(context), temperature)

    def _check_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        name = type(self).__name__
        if self.context_dim == 0:
            if context is not None:
                raise ValueError(
                    f"{name} is unconditional (context_dim=0): call it without a context; "
                    f"got a context of shape {tuple(context.shape)}"
                )
            return None
        return check_context(name, context, self.context_dim, "call flow(context)")

    def extra_repr(self) -> str:
        extra = f"dim={self.dim}" if len(self.event_shape) == 1 else f"shape={self.event_shape}"
        return extra + (f", context_dim={self.context_dim}" if self.context_dim else "")


def _module_of(t: Transform) -> nn.Module | None:
    """The module holding a transform's parameters: itself, or for ``m.inv`` the module ``m``.

    ``t.inv`` of a Pyro ``TransformModule`` is a plain ``Transform``; registering the module
    behind it keeps its parameters visible to ``pyro.module``, optimisers and ``.to()``.
    """
    if isinstance(t, nn.Module):
        return t
    if isinstance(t, _InverseTransform) and isinstance(t.inv, nn.Module):
        return t.inv
    return None


def _mixing(kind: str | None, dim: int) -> Transform | None:
    if kind is None:
        return None
    if kind == "reverse":
        return Reverse(dim)
    if kind == "random":
        return Permutation(dim)
    if kind == "lu":
        return LULinear(dim)
    if kind == "qr":
        return QRLinear(dim)
    raise ValueError(f"mixing: expected one of {MIXINGS}; got {kind!r}")


def _check_layers(layers: int) -> int:
    return check_positive_int("layers", layers)


def _stack(blocks: Sequence[Transform], dim: int, mixing: str | None, actnorm: bool) -> list:
    """``block, [ActNorm]`` per layer, with ``mixing`` between layers (base side first)."""
    _mixing(mixing, dim)  # validate even when there is a single layer
    parts: list[Transform] = []
    for i, block in enumerate(blocks):
        if i > 0 and mixing is not None:
            parts.append(_mixing(mixing, dim))
        parts.append(block)
        if actnorm:
            parts.append(ActNorm(dim))
    return parts


class NICE(Flow):
    """NICE: additive (volume-preserving) coupling layers and a final diagonal scaling.

    ``layers`` :class:`~pyroflows.transforms.AdditiveCoupling` layers whose masks alternate
    (what one layer keeps, the next transforms), preceded on the base side by an
    :class:`~pyroflows.transforms.ElementwiseAffine` scaling, the only part that changes volume,
    as in the paper. Sampling and density are both one pass per layer.

    Args:
        dim: number of features (at least 2).
        layers: number of coupling layers (the paper uses 4).
        hidden: hidden widths of each coupling conditioner.
        context_dim: size of the context (0: unconditional).
        mask: ``"half"`` or ``"alternate"``, flipped from layer to layer.
        base: see :class:`Flow`.

    References:
        NICE: Non-linear Independent Components Estimation (Dinh, Krueger and Bengio, 2014).

    Example:
        >>> import pyroflows as pf
        >>> pf.NICE(dim=4)().sample((2,)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 4,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        mask: str = "half",
        base: str | nn.Module = "normal",
    ) -> None:
        couplings = [
            AdditiveCoupling(dim, hidden, coupling_mask(dim, mask, flip=i % 2), context_dim)
            for i in range(_check_layers(layers))
        ]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(mask=mask, base=base)
        super().__init__(
            [ElementwiseAffine(dim), *couplings], dim, context_dim, base, config=config
        )


class RealNVP(Flow):
    r"""RealNVP: affine coupling layers with alternating masks.

    Each layer is an :class:`~pyroflows.transforms.AffineCoupling` (soft-clamped log-scales,
    masks flipped from layer to layer) and, with ``actnorm=True``, an
    :class:`~pyroflows.transforms.ActNorm` on its data side, which standardises the data the
    first time it is scored (the batch-free normalisation of Glow, in place of RealNVP's batch
    normalisation). ActNorm is off by default: on the 2-D ring of Gaussians it doubled the KL
    gap at equal budget (0.54 against 0.29 nats, ``benchmarks/density.py`` settings) and gained
    0.02 nats on the checkerboard; turn it on for data far from unit scale. Sampling and
    density are both one conditioner pass per layer.

    For images, the paper's multi-scale architecture is :class:`ImageRealNVP`.
    ``RealNVP(shape=(C, H, W), ...)`` still builds one, with a ``DeprecationWarning``.

    Args:
        dim: number of features (at least 2).
        layers: number of coupling layers.
        hidden: hidden widths of each coupling conditioner.
        context_dim: size of the context (0: unconditional).
        mask: ``"half"`` or ``"alternate"``, flipped from layer to layer.
        actnorm: add an ActNorm after each coupling layer.
        log_scale_bound: soft bound on each layer's log-scale.
        base: see :class:`Flow`.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.RealNVP(dim=3, layers=2, hidden=(16,), context_dim=2)
        >>> flow(torch.randn(7, 2)).batch_shape
        torch.Size([7])
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        # RealNVP(shape=...) was the image flow before it became a class of its own. The object
        # returned is not a RealNVP, so RealNVP.__init__ does not run on it.
        if cls is RealNVP and kwargs.get("shape") is not None:
            if args or kwargs.get("dim") is not None:
                raise ValueError("RealNVP: give dim (vectors) or shape (images), not both")
            warnings.warn(
                "RealNVP(shape=...) is deprecated: use pyroflows.flows.ImageRealNVP(shape, ...), "
                "the same multi-scale image flow",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs.pop("dim", None)
            return ImageRealNVP(**kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        dim: int,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        mask: str = "half",
        actnorm: bool = False,
        log_scale_bound: float = 3.0,
        base: str | nn.Module = "normal",
    ) -> None:
        couplings = [
            AffineCoupling(
                dim,
                hidden,
                coupling_mask(dim, mask, flip=i % 2),
                context_dim,
                log_scale_bound=log_scale_bound,
            )
            for i in range(_check_layers(layers))
        ]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(mask=mask, actnorm=actnorm, log_scale_bound=log_scale_bound, base=base)
        super().__init__(
            _stack(couplings, dim, None, actnorm), dim, context_dim, base, config=config
        )


# RealNVP.__new__ only redirects the deprecated RealNVP(shape=...): the constructor's signature,
# for inspect.signature, help() and the docs, is __init__'s.
RealNVP.__new__.__signature__ = inspect.signature(RealNVP.__init__)


class MAF(Flow):
    """Masked autoregressive flow: fast density, sequential sampling.

    Each layer is a :class:`~pyroflows.transforms.MaskedAffineAutoregressive` in MAF
    orientation: the density direction (data -> base, ``log_prob``) is one MADE pass per layer;
    sampling needs ``dim`` sequential passes per layer. Between layers the feature order is
    reversed (``mixing="reverse"``, as in the paper); with ``actnorm=True`` an ActNorm follows
    each layer on its data side (batch-free, in place of the paper's batch normalisation). It
    is off by default: on the 2-D ring it cost 0.1 nats of KL at equal budget (0.37 against
    0.27) and gained 0.02 on the checkerboard; turn it on for data far from unit scale.
    Choose MAF to fit data by maximum likelihood; choose :class:`IAF` for variational inference.

    Args:
        dim: number of features.
        layers: number of autoregressive layers (the paper uses 5).
        hidden: hidden widths of each MADE.
        context_dim: size of the context (0: unconditional).
        mixing: ``"reverse"``, ``"random"``, ``"lu"``, ``"qr"`` or ``None`` between layers.
        actnorm: add an ActNorm after each layer.
        log_scale_bound: soft bound on each layer's log-scale.
        base: see :class:`Flow`.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios, Pavlakou and Murray,
        2017).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> pf.MAF(dim=3, layers=2, hidden=(16, 16))().log_prob(torch.zeros(3)).shape
        torch.Size([])
    """

    orientation = "maf"

    def __init__(
        self,
        dim: int,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        mixing: str | None = "reverse",
        actnorm: bool = False,
        log_scale_bound: float = 3.0,
        base: str | nn.Module = "normal",
    ) -> None:
        blocks = [
            MaskedAffineAutoregressive(
                dim,
                hidden,
                context_dim,
                orientation=self.orientation,
                log_scale_bound=log_scale_bound,
            )
            for _ in range(_check_layers(layers))
        ]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(mixing=mixing, actnorm=actnorm, log_scale_bound=log_scale_bound, base=base)
        super().__init__(
            _stack(blocks, dim, mixing, actnorm), dim, context_dim, base, config=config
        )


class IAF(MAF):
    """Inverse autoregressive flow: fast sampling, and free density of its own samples.

    As :class:`MAF` with the orientation swapped: sampling (base -> data) is one MADE pass per
    layer, and the distribution scores its own samples (``d.log_prob(d.rsample())``) from the
    cached pass, with no inversion. Scoring other points needs ``dim`` sequential passes per
    layer. This is the flow for variational posteriors (guides, VAE encoders). No ActNorm by
    default: in variational inference there is no data batch to initialise it from.

    Args:
        dim: number of features.
        layers: number of autoregressive layers.
        hidden: hidden widths of each MADE.
        context_dim: size of the context (0: unconditional), e.g. an encoder's features.
        mixing: ``"reverse"``, ``"random"``, ``"lu"``, ``"qr"`` or ``None`` between layers.
        actnorm: add an ActNorm after each layer.
        log_scale_bound: soft bound on each layer's log-scale.
        base: see :class:`Flow`; ``"conditional_normal"`` gives the IAF paper's VAE posterior.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma, Salimans,
        Jozefowicz, Chen, Sutskever and Welling, 2016).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> q = pf.IAF(dim=4, layers=2, hidden=(16, 16), context_dim=3)
        >>> d = q(torch.randn(10, 3))
        >>> z = d.rsample()
        >>> z.shape, d.log_prob(z).shape
        (torch.Size([10, 4]), torch.Size([10]))
    """

    orientation = "iaf"


class NSF(Flow):
    """Neural spline flow: rational-quadratic spline layers with LU-linear mixing.

    With ``autoregressive=False`` (the default) each layer is a
    :class:`~pyroflows.transforms.SplineCoupling` (masks flipped from layer to layer): sampling
    and density are both one conditioner pass per layer. With ``autoregressive=True`` each layer
    is a :class:`~pyroflows.transforms.SplineAutoregressive` in MAF orientation (fast density,
    ``dim`` sequential passes to sample). Between layers an :class:`~pyroflows.transforms.LULinear`
    mixes the features, as in the paper; with ``actnorm=True`` an ActNorm follows each layer on
    its data side, which matters for splines: the data must land in ``[-bound, bound]``, where
    the spline acts (outside it the map is the identity).

    Args:
        dim: number of features (at least 2 for coupling layers).
        layers: number of spline layers.
        hidden: hidden widths of each conditioner.
        context_dim: size of the context (0: unconditional).
        bins: number of spline bins.
        bound: the spline acts on ``[-bound, bound]``, identity outside.
        autoregressive: autoregressive (MADE) conditioners instead of coupling.
        mixing: ``"lu"``, ``"qr"``, ``"reverse"``, ``"random"`` or ``None`` between layers.
        actnorm: add an ActNorm after each layer.
        base: see :class:`Flow`.

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray and Papamakarios, 2019).

    Example:
        >>> import pyroflows as pf
        >>> pf.NSF(dim=2, layers=2, hidden=(16,), bins=4)().sample((3,)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        bins: int = 8,
        bound: float = 5.0,
        autoregressive: bool = False,
        mixing: str | None = "lu",
        actnorm: bool = True,
        base: str | nn.Module = "normal",
    ) -> None:
        _check_layers(layers)
        if autoregressive:
            blocks = [
                SplineAutoregressive(dim, hidden, context_dim, bins=bins, bound=bound)
                for _ in range(layers)
            ]
        else:
            if dim < 2:
                raise ValueError(
                    f"dim: spline coupling needs at least 2 features; got {dim} "
                    "(use autoregressive=True for one feature)"
                )
            blocks = [
                SplineCoupling(
                    dim,
                    hidden,
                    coupling_mask(dim, "half", flip=i % 2),
                    context_dim,
                    bins=bins,
                    bound=bound,
                )
                for i in range(layers)
            ]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(bins=bins, bound=bound, autoregressive=autoregressive, mixing=mixing)
        config.update(actnorm=actnorm, base=base)
        super().__init__(
            _stack(blocks, dim, mixing, actnorm), dim, context_dim, base, config=config
        )


def _check_image_shape(shape: Sequence[int], levels: int, name: str) -> tuple[int, int, int]:
    shape = _check_shape(shape)
    check_positive_int(name, levels)
    factor = 2 ** (levels if name == "levels" else levels - 1)
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"shape: height and width must be divisible by {factor} for {name}={levels} "
            f"(one 2x2 squeeze per {name[:-1]}); got {shape}"
        )
    return shape


def _realnvp_scale(shape, i, scales, channels, blocks, context_dim, bound) -> list:
    """RealNVP's image layers at scale ``i`` on ``shape``, base side first."""

    def coupling(s, mask, flip):
        return ImageAffineCoupling(
            s, channels, blocks, mask, bool(flip), context_dim, log_scale_bound=bound
        )

    if i == scales - 1:
        return [coupling(shape, "checkerboard", k % 2) for k in range(4)]
    c, h, w = shape
    squeezed = (4 * c, h // 2, w // 2)
    coarser = _realnvp_scale(
        (2 * c, h // 2, w // 2), i + 1, scales, channels, blocks, context_dim, bound
    )
    inner = [FactorOut(squeezed, 2 * c, coarser, context_dim)]
    inner += [coupling(squeezed, "channel", k % 2) for k in range(3)]
    return [
        Squeezed(shape, inner, context_dim),
        *(coupling(shape, "checkerboard", k % 2) for k in range(3)),
    ]


class ImageRealNVP(Flow):
    r"""RealNVP's multi-scale architecture over images: one distribution over ``(C, H, W)``.

    At each of ``scales`` scales but the last (base side last): three
    :class:`~pyroflows.transforms.ImageAffineCoupling` layers with alternating checkerboard
    masks, a squeeze, three with alternating channel masks, and the factor-out of half of the
    channels (:class:`~pyroflows.transforms.FactorOut`: they go to the base); the last scale has
    four checkerboard couplings. The conditioners are :class:`~pyroflows.nn_image.ConvResNet`\ s
    with ``channels`` hidden channels and ``blocks`` residual blocks. With ``logit`` (default
    0.05) the data side ends in :class:`~pyroflows.transforms.ImageSigmoid`: the flow models
    images in ``[0, 1]`` (e.g. dequantised 8-bit images, :func:`pyroflows.images.dequantize`)
    through the paper's logit pre-processing, its Jacobian included in ``log_prob``. Sampling
    and density are both one conditioner pass per coupling.

    Args:
        shape: ``(C, H, W)``, with ``H`` and ``W`` divisible by ``2 ** (scales - 1)``.
        scales: number of scales.
        channels: hidden channels of the convolutional conditioners.
        blocks: residual blocks per conditioner.
        context_dim: size of the context (0: unconditional); it reaches every coupling's
            conditioner as constant extra channels (e.g. a one-hot class).
        log_scale_bound: soft bound on each coupling's log-scale.
        logit: ``alpha`` of the logit pre-processing, or ``None`` for real-valued images.
        base: see :class:`Flow`.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.flows.ImageRealNVP((1, 8, 8), channels=8, blocks=1)
        >>> d = flow()
        >>> d.event_shape, d.log_prob(torch.rand(5, 1, 8, 8)).shape
        (torch.Size([1, 8, 8]), torch.Size([5]))
    """

    image_builder = True

    def __init__(
        self,
        shape: Sequence[int],
        scales: int = 2,
        channels: int = 64,
        blocks: int = 2,
        context_dim: int = 0,
        log_scale_bound: float = 3.0,
        logit: float | None = 0.05,
        base: str | nn.Module = "normal",
    ) -> None:
        shape = _check_image_shape(shape, scales, "scales")
        parts = _realnvp_scale(shape, 0, scales, channels, blocks, context_dim, log_scale_bound)
        if logit is not None:
            parts.append(ImageSigmoid(shape, alpha=logit))
        config = {"shape": shape, "scales": scales, "channels": channels, "blocks": blocks}
        config.update(context_dim=context_dim, log_scale_bound=log_scale_bound, logit=logit)
        config.update(base=base)
        super().__init__(parts, shape, context_dim, base, config=config)


class Glow(Flow):
    """Glow: multi-scale flow of ActNorm, invertible 1x1 convolutions and affine couplings.

    One distribution over ``(C, H, W)`` images. At each of ``levels`` levels (data side to
    base side, as in the paper): a squeeze, ``steps`` steps of flow, and, except at the last
    level, the factor-out of half of the channels. A step is
    :class:`~pyroflows.transforms.ActNorm2d` (initialised from the first batch),
    :class:`~pyroflows.transforms.InvConv1x1` (LU-parametrised, starting at a random rotation)
    and an :class:`~pyroflows.transforms.ImageAffineCoupling` with a channel mask (alternating
    halves) whose conditioner is a :class:`~pyroflows.nn_image.ConvResNet` with ``channels``
    hidden channels and ``blocks`` residual blocks, zero-initialised at its output. The factored
    channels reach the standard Normal base through :class:`~pyroflows.transforms.FactorOut`;
    with ``split_prior=True`` (the default) a channel coupling that reads the kept half shifts
    and scales them first: Glow's learned prior ``p(z_out | z_kept)``. With ``logit`` the data
    side ends in :class:`~pyroflows.transforms.ImageSigmoid` (images in ``[0, 1]``).

    Args:
        shape: ``(C, H, W)``, with ``H`` and ``W`` divisible by ``2 ** levels``.
        levels: number of levels ``L``.
        steps: steps of flow per level ``K``.
        channels: hidden channels of the coupling conditioners.
        blocks: residual blocks per conditioner (0: conv, activation, conv).
        context_dim: size of the context (0: unconditional), e.g. a one-hot class for a
            class-conditional model; every conditioner sees it as constant extra channels.
        split_prior: learn the prior of the factored-out channels from the kept ones.
        logit: ``alpha`` of the logit pre-processing, or ``None`` for real-valued images.
        base: see :class:`Flow`.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.Glow((1, 8, 8), levels=2, steps=2, channels=8, context_dim=10)
        >>> d = flow(torch.eye(10)[:3])  # one-hot classes
        >>> d.sample().shape, d.log_prob(torch.rand(3, 1, 8, 8)).shape
        (torch.Size([3, 1, 8, 8]), torch.Size([3]))
    """

    image_builder = True

    def __init__(
        self,
        shape: Sequence[int],
        levels: int = 3,
        steps: int = 8,
        channels: int = 128,
        blocks: int = 1,
        context_dim: int = 0,
        split_prior: bool = True,
        logit: float | None = 0.05,
        base: str | nn.Module = "normal",
    ) -> None:
        shape = _check_image_shape(shape, levels, "levels")
        check_positive_int("steps", steps)

        def level(s: tuple[int, int, int], i: int) -> list:
            c, h, w = s
            squeezed = (4 * c, h // 2, w // 2)
            inner: list = []
            if i < levels - 1:
                inner.append(
                    FactorOut(squeezed, 2 * c, level((2 * c, h // 2, w // 2), i + 1), context_dim)
                )
                if split_prior:
                    inner.append(
                        ImageAffineCoupling(
                            squeezed, channels, blocks, "channel", False, context_dim
                        )
                    )
            for k in range(steps):
                inner += [
                    ImageAffineCoupling(
                        squeezed, channels, blocks, "channel", bool(k % 2), context_dim
                    ),
                    InvConv1x1(4 * c),
                    ActNorm2d(4 * c),
                ]
            return [Squeezed(s, inner, context_dim)]

        parts = level(shape, 0)
        if logit is not None:
            parts.append(ImageSigmoid(shape, alpha=logit))
        config = {"shape": shape, "levels": levels, "steps": steps, "channels": channels}
        config.update(blocks=blocks, context_dim=context_dim, split_prior=split_prior)
        config.update(logit=logit, base=base)
        super().__init__(parts, shape, context_dim, base, config=config)


ELEMENTWISE = ("sinh_arcsinh", "leaky_relu", None)


class LinearFlow(Flow):
    """Learnable linear maps interleaved with elementwise nonlinearities.

    Each layer is an :class:`~pyroflows.transforms.LULinear` (``linear="lu"``) or
    :class:`~pyroflows.transforms.QRLinear` (``linear="qr"``) followed by an elementwise
    bijection (:class:`~pyroflows.transforms.SinhArcsinh`, learnable skew and tails, or
    :class:`~pyroflows.transforms.LeakyReLU`); a final
    :class:`~pyroflows.transforms.ElementwiseAffine` adds the shift. One layer without a
    nonlinearity is a full-covariance Gaussian. Both directions are one pass, O(dim²) per point.
    There are no conditioners: a conditional LinearFlow reads the context through its base
    (``"conditional_normal"``, the default when ``context_dim > 0``).

    Args:
        dim: number of features.
        layers: number of linear layers.
        hidden: hidden widths of the conditional base's network (used when conditional).
        context_dim: size of the context (0: unconditional).
        linear: ``"lu"`` or ``"qr"``.
        elementwise: ``"sinh_arcsinh"``, ``"leaky_relu"`` or ``None``.
        base: see :class:`Flow`; ``None`` picks ``"conditional_normal"`` when ``context_dim > 0``
            and ``"normal"`` otherwise.

    Example:
        >>> import pyroflows as pf
        >>> pf.LinearFlow(dim=3, layers=2)().rsample((4,)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 3,
        hidden: Sequence[int] = (64,),
        context_dim: int = 0,
        linear: str = "lu",
        elementwise: str | None = "sinh_arcsinh",
        base: str | nn.Module | None = None,
    ) -> None:
        if linear not in ("lu", "qr"):
            raise ValueError(f"linear: expected 'lu' or 'qr'; got {linear!r}")
        if elementwise not in ELEMENTWISE:
            raise ValueError(f"elementwise: expected one of {ELEMENTWISE}; got {elementwise!r}")
        parts: list[Transform] = []
        for _ in range(_check_layers(layers)):
            parts.append(_mixing(linear, dim))
            if elementwise == "sinh_arcsinh":
                parts.append(SinhArcsinh(dim))
            elif elementwise == "leaky_relu":
                parts.append(LeakyReLU(0.5))
        parts.append(ElementwiseAffine(dim))
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(linear=linear, elementwise=elementwise, base=base)
        if base is None:
            base = "conditional_normal" if context_dim else "normal"
        super().__init__(parts, dim, context_dim, base, base_hidden=hidden, config=config)


# -- flows with numerical inverses (NAF, BNAF, residual, planar/radial/Sylvester) -----------------
#: The values of the new builders' ``fast``: which direction is one network pass (the other is
#: a numerical solve). ``"density"``: data -> base (``log_prob``); ``"sampling"``: base -> data.
FAST = ("density", "sampling")


def _oriented(block: FlowTransform, fast: str) -> FlowTransform:
    """``block`` when its forward pass (base -> data) is to be the fast direction, else
    :class:`~pyroflows.transforms.Inverted` (the network evaluation becomes the density
    direction, data -> base)."""
    if fast not in FAST:
        raise ValueError(f"fast: expected 'density' or 'sampling'; got {fast!r}")
    return block if fast == "sampling" else Inverted(block)


class NAF(Flow):
    """Neural autoregressive flow: masked autoregressive layers with a sigmoidal transformer.

    Each layer is a :class:`~pyroflows.transforms.MaskedAutoregressive` whose elementwise map is
    the deep sigmoidal (:class:`~pyroflows.transforms.DSF`) or deep dense sigmoidal
    (:class:`~pyroflows.transforms.DDSF`) transformer of Huang et al. (2018), with the feature
    order reversed between layers. The transformer is analytic one way and inverted numerically
    (a bracketed Newton solve per feature) the other, so the conditioner reads the side whose
    direction is to be fast. ``fast="density"`` (default; the paper's NAF): data -> base
    (``log_prob``) is one MADE pass and the analytic transformer per layer, sampling solves for
    one feature after another (``dim`` sequential passes per layer, each a numerical solve).
    ``fast="sampling"``: sampling is one pass per layer and scores its own samples for free,
    scoring other points solves (what :class:`~pyroflows.infer.AutoFlowGuide` builds).

    Args:
        dim: number of features.
        layers: number of autoregressive layers.
        hidden: hidden widths of each MADE.
        context_dim: size of the context (0: unconditional).
        transformer: ``"dsf"`` or ``"ddsf"``.
        units: sigmoid components of the DSF, or hidden units of each DDSF layer.
        fast: ``"density"`` or ``"sampling"``: the direction that is one pass per layer.
        mixing: ``"reverse"``, ``"random"``, ``"lu"``, ``"qr"`` or ``None`` between layers.
        base: see :class:`Flow`.

    References:
        Neural Autoregressive Flows (Huang, Krueger, Lacoste and Courville, 2018).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.NAF(dim=3, layers=2, hidden=(16,))
        >>> flow().log_prob(torch.zeros(3)).shape
        torch.Size([])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        transformer: str = "dsf",
        units: int = 8,
        fast: str = "density",
        mixing: str | None = "reverse",
        base: str | nn.Module = "normal",
    ) -> None:
        if transformer not in ("dsf", "ddsf"):
            raise ValueError(f"transformer: expected 'dsf' or 'ddsf'; got {transformer!r}")

        def layer() -> FlowTransform:
            transform = DSF(components=units) if transformer == "dsf" else DDSF(units=units)
            # The conditioner reads the transform's input, the map is analytic forward: in the
            # sampling direction as it is, in the density direction inverted.
            made = MaskedAutoregressive(dim, transform, hidden, context_dim, orientation="iaf")
            return _oriented(made, fast)

        blocks = [layer() for _ in range(_check_layers(layers))]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(transformer=transformer, units=units, fast=fast)
        config.update(mixing=mixing, base=base)
        super().__init__(_stack(blocks, dim, mixing, False), dim, context_dim, base, config=config)


class BNAF(Flow):
    """Block neural autoregressive flow: one network per layer, autoregressive by block masks.

    Each layer is a :class:`~pyroflows.transforms.BNAF` transform (De Cao et al. 2019: masked
    block-triangular weights with positive diagonal blocks, tanh between them, an exact
    log|det J|, and a positive skip connection that makes it onto ``R^dim``), with the feature
    order reversed between layers. Its network evaluation is one pass; its inverse is a
    numerical solve, feature after feature. ``fast="density"`` (default) puts the network
    evaluation in the density direction (data -> base, ``log_prob``; sampling solves);
    ``fast="sampling"`` in the sampling direction, which is what a variational guide wants
    (NumPyro's ``AutoBNAFNormal``; :class:`~pyroflows.infer.AutoFlowGuide` with
    ``flow="bnaf"`` builds that).

    **Learning rate.** Weight normalisation makes each step of the raw weights scale-free, and at
    :func:`~pyroflows.fit`'s default ``lr=1e-3`` a BNAF learns slowly: on the 2-D ring
    (``benchmarks/density.py``, 1500 steps, 87k parameters) its KL gap was 1.56 nats at 1e-3 and
    0.39 at ``lr=1e-2``. Start at 1e-2.

    Args:
        dim: number of features.
        layers: number of BNAF transforms.
        hidden_factor: hidden units per feature in each masked layer.
        depth: masked hidden layers per BNAF transform.
        context_dim: size of the context (0: unconditional).
        fast: ``"density"`` or ``"sampling"``: the direction that is one network pass.
        mixing: ``"reverse"``, ``"random"``, ``"lu"``, ``"qr"`` or ``None`` between layers.
        base: see :class:`Flow`.

    References:
        Block Neural Autoregressive Flow (De Cao, Aziz and Titov, 2019).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.BNAF(dim=2, layers=1, hidden_factor=4)
        >>> flow().log_prob(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 1,
        hidden_factor: int = 8,
        depth: int = 2,
        context_dim: int = 0,
        fast: str = "density",
        mixing: str | None = "reverse",
        base: str | nn.Module = "normal",
    ) -> None:
        blocks = [
            _oriented(BNAFTransform(dim, hidden_factor, depth, context_dim), fast)
            for _ in range(_check_layers(layers))
        ]
        config = {"dim": dim, "layers": layers, "hidden_factor": hidden_factor, "depth": depth}
        config.update(context_dim=context_dim, fast=fast, mixing=mixing, base=base)
        super().__init__(_stack(blocks, dim, mixing, False), dim, context_dim, base, config=config)


class ResidualFlow(Flow):
    """Residual flow: invertible residual blocks ``y = x + g(x)`` with ``Lip(g) < 1``.

    Each layer is a :class:`~pyroflows.transforms.Residual` block (i-ResNet, Behrmann et al.
    2019; Residual Flows, Chen et al. 2019): a spectrally normalised MLP with LipSwish units,
    log|det J| exact for up to :data:`~pyroflows.transforms.residual.EXACT_LOG_DET_MAX_DIM`
    features and an unbiased Russian-roulette estimate above (``logdet``; the estimate makes
    ``log_prob`` stochastic), and a fixed-point inverse. ``fast="density"`` (default) puts the
    block's evaluation in the density direction (data -> base, as in the papers); sampling
    then iterates to the fixed point (about ``log(tol) / log(Lip)`` passes per block).

    **Depth and learning rate.** Each block moves points by a contraction, so a residual flow
    needs many blocks, and spectral normalisation makes the raw weights' steps scale-free: on
    the 2-D ring (``benchmarks/density.py``, 1500 steps, about 85k parameters) 5 blocks of
    (128, 128) reached a KL gap of 1.87 nats at :func:`~pyroflows.fit`'s default ``lr=1e-3``
    and 0.21 at ``lr=1e-2``; 20 blocks of (62, 62) reached 0.17 and 0.025 (the best of every
    flow there). Prefer more, narrower blocks, and start at ``lr=1e-2``.

    Args:
        dim: number of features.
        layers: number of residual blocks.
        hidden: hidden widths of each block's MLP.
        context_dim: size of the context (0: unconditional).
        coeff: the Lipschitz bound of each linear layer (below 1).
        logdet: ``"auto"``, ``"exact"`` or ``"roulette"``.
        fast: ``"density"`` or ``"sampling"``: the direction that is one network pass.
        actnorm: add an ActNorm after each block (as the papers do).
        base: see :class:`Flow`.

    References:
        Invertible Residual Networks (Behrmann et al., 2019); Residual Flows for Invertible
        Generative Modeling (Chen, Behrmann, Duvenaud and Jacobsen, 2019).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.ResidualFlow(dim=2, layers=2, hidden=(16,))
        >>> flow().log_prob(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        coeff: float = 0.97,
        logdet: str = "auto",
        fast: str = "density",
        actnorm: bool = False,
        base: str | nn.Module = "normal",
    ) -> None:
        blocks = [
            _oriented(Residual(dim, hidden, context_dim, coeff=coeff, logdet=logdet), fast)
            for _ in range(_check_layers(layers))
        ]
        config = {"dim": dim, "layers": layers, "hidden": hidden, "context_dim": context_dim}
        config.update(coeff=coeff, logdet=logdet, fast=fast, actnorm=actnorm, base=base)
        super().__init__(_stack(blocks, dim, None, actnorm), dim, context_dim, base, config=config)


class SylvesterFlow(Flow):
    """Planar, radial or Sylvester flows: the variational posteriors of Rezende & Mohamed (2015)
    and van den Berg et al. (2018).

    Each layer is a :class:`~pyroflows.transforms.Planar`, :class:`~pyroflows.transforms.Radial`
    or :class:`~pyroflows.transforms.Sylvester` (``kind="orthogonal"``, ``"householder"`` or
    ``"triangular"``, the last alternating the identity and the reversal as its permutation) with
    the papers' invertibility constraints. With ``context_dim > 0`` the parameters of every
    layer are read from the context (amortised, as in the Sylvester paper's VAE). The sampling
    direction is one pass (the fast one, the default ``fast="sampling"``); the density of a
    point the flow did not draw needs a numerical inverse (scalar monotone solves).

    Args:
        dim: number of features.
        layers: number of transforms.
        context_dim: size of the context (0: unconditional).
        kind: ``"planar"``, ``"radial"``, ``"orthogonal"``, ``"householder"`` or
            ``"triangular"``.
        columns: orthogonal Sylvester: columns of Q (default: ``dim``).
        reflections: Householder Sylvester: reflections per layer (default: the transform's).
        fast: ``"sampling"`` (default) or ``"density"``.
        base: see :class:`Flow`.

    References:
        Variational Inference with Normalizing Flows (Rezende and Mohamed, 2015); Sylvester
        Normalizing Flows for Variational Inference (van den Berg, Hasenclever, Tomczak and
        Welling, 2018).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.SylvesterFlow(dim=4, layers=2, kind="householder")
        >>> flow().rsample((3,)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        dim: int,
        layers: int = 4,
        context_dim: int = 0,
        kind: str = "orthogonal",
        columns: int | None = None,
        reflections: int | None = None,
        fast: str = "sampling",
        base: str | nn.Module = "normal",
    ) -> None:
        if kind not in SYLVESTER_KINDS:
            raise ValueError(f"kind: expected one of {SYLVESTER_KINDS}; got {kind!r}")

        def block(i: int) -> FlowTransform:
            if kind == "planar":
                return Planar(dim, context_dim)
            if kind == "radial":
                return Radial(dim, context_dim)
            options: dict[str, Any] = {}
            if kind == "orthogonal" and columns is not None:
                options["columns"] = columns
            if kind == "householder" and reflections is not None:
                options["reflections"] = reflections
            if kind == "triangular":
                options["flip"] = bool(i % 2)
            return Sylvester(dim, kind, context_dim, **options)

        blocks = [_oriented(block(i), fast) for i in range(_check_layers(layers))]
        config = {"dim": dim, "layers": layers, "context_dim": context_dim, "kind": kind}
        config.update(columns=columns, reflections=reflections, fast=fast, base=base)
        super().__init__(blocks, dim, context_dim, base, config=config)


#: The layers :class:`SylvesterFlow` builds (its ``kind``).
SYLVESTER_KINDS = ("planar", "radial", "orthogonal", "householder", "triangular")


class CNF(Flow):
    """A continuous normalizing flow: the base pushed along the ODE ``dx/dt = v(x, t[, context])``.

    One :class:`~pyroflows.transforms.CNF` transform (FFJORD, Grathwohl et al. 2019) with the
    default :class:`~pyroflows.transforms.VelocityField` (an MLP of ``x``, time features and the
    context, starting at ``v = 0``). Sampling and ``log_prob`` each solve the ODE (torchdiffeq;
    adaptive ``"dopri5"`` with ``atol = rtol = 1e-5`` by default) with the log-determinant
    integrated alongside: exactly up to
    :data:`~pyroflows.transforms.continuous.EXACT_TRACE_MAX_DIM` features, by Hutchinson's
    estimate above (``trace``), which makes ``log_prob`` a stochastic estimate; evaluate with
    ``with flow.options(trace="exact"): ...`` then.

    Two ways to train it:

    * maximum likelihood, ``pf.fit(flow, data)``: every step solves the ODE with the trace and
      back-propagates through it (or by the adjoint method, ``adjoint=True``);
    * flow matching, ``pf.fit(flow, data, loss="flow_matching")``
      (:class:`~pyroflows.engine.FlowMatching`): regression of ``v`` on the straight paths from
      base draws to data, no ODE solved during training (validation measures the exact
      log-likelihood). Much cheaper per step, and the usual choice for larger problems.

    As a variational posterior (``AutoFlowGuide(flow="cnf")``) every step solves the ODE
    forward with the trace: 15-20x the cost of an IAF step; it had the lowest gap on curved
    posteriors and the highest on a funnel (the docs page "Continuous flows and flow
    matching").

    ``flow().sample(...)`` (without gradients) solves the path alone; ``log_prob`` of those
    samples then integrates the trace in a second solve (forward from the draws under
    ``torch.no_grad()``, with the options they were drawn with; an inverse solve when
    gradients are on). ``rsample`` (with gradients) integrates both at once, so that
    ``log_prob`` of its draws costs nothing more.

    Args:
        dim: number of features.
        hidden: hidden widths of the velocity field.
        context_dim: size of the context (0: unconditional).
        activation: ``"silu"`` (default), ``"tanh"`` or ``"softplus"``.
        solver: torchdiffeq method: ``"dopri5"`` (default) or another adaptive one, or a
            fixed-step ``"euler"``, ``"midpoint"``, ``"rk4"``.
        atol: absolute tolerance of adaptive solvers.
        rtol: relative tolerance of adaptive solvers.
        steps: steps over ``[0, 1]`` of fixed-step solvers.
        trace: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        adjoint: gradients by the adjoint method (memory independent of the steps; slower).
        base: see :class:`Flow` (the source of flow matching's paths).

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.CNF(dim=2, hidden=(16, 16))
        >>> d = flow()
        >>> x = d.sample((5,))
        >>> d.log_prob(x).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str = "silu",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        steps: int = 32,
        trace: str = "auto",
        adjoint: bool = False,
        base: str | nn.Module = "normal",
    ) -> None:
        options = dict(solver=solver, atol=atol, rtol=rtol, steps=steps, trace=trace)
        options.update(adjoint=adjoint, activation=activation)
        transform = CNFTransform(dim, hidden, context_dim, **options)
        config = {"dim": dim, "hidden": hidden, "context_dim": context_dim, **options}
        super().__init__([transform], dim, context_dim, base, config={**config, "base": base})

    @property
    def transform(self) -> CNFTransform:
        """The :class:`~pyroflows.transforms.CNF` transform (its field is ``transform.field``)."""
        return self.transforms[0]

    def options(self, **options: Any):
        """Change the solver's or the trace's options for a ``with`` block.

        See :meth:`pyroflows.transforms.CNF.options`.

        Example:
            >>> import torch, pyroflows as pf
            >>> flow = pf.CNF(dim=2, hidden=(16,))
            >>> with flow.options(solver="rk4", steps=10):
            ...     flow().sample((3,)).shape
            torch.Size([3, 2])
        """
        return self.transform.options(**options)

    def sample_paths(
        self,
        sample_shape: torch.Size | tuple = (),
        times: torch.Tensor | Sequence[float] | int = 33,
        context: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Base draws and the paths that carry them to samples (no log-densities computed).

        Args:
            sample_shape: the number of paths (as ``sample``'s).
            times: times in ``[0, 1]`` at which to report the points, or their number.
            context: for a conditional flow, ``(*batch, context_dim)``.
            temperature: the base's temperature (see :meth:`Flow.forward`).

        Returns:
            ``(len(times), *sample_shape, *batch, dim)``; entry ``-1`` holds samples of the
            flow and entry ``0`` the base draws. Without gradients.

        Example:
            >>> import pyroflows as pf
            >>> pf.CNF(dim=2, hidden=(16,)).sample_paths((100,), times=5).shape
            torch.Size([5, 100, 2])
        """
        context = self._check_context(context)
        with torch.no_grad():
            base = FlowDistribution.from_flow(self, context, temperature).base_dist
            return self.transform.path(base.sample(sample_shape), times, context)


# -- the builder table ----------------------------------------------------------------------------
_BUILTIN = {
    "nice": NICE,
    "realnvp": RealNVP,
    "maf": MAF,
    "iaf": IAF,
    "nsf": NSF,
    "linear": LinearFlow,
    "naf": NAF,
    "bnaf": BNAF,
    "residual": ResidualFlow,
    "sylvester": SylvesterFlow,
    "cnf": CNF,
    "glow": Glow,
    "image_realnvp": ImageRealNVP,
}
_BUILDERS: dict[str, type[Flow]] = dict(_BUILTIN)

#: Flow builders by name, read-only: the names of the command line's ``--flow``,
#: ``AutoFlowGuide(flow=NAME)`` and the ``"builder"`` of a saved flow's ``config.json``, which
#: :func:`pyroflows.load` resolves here (and nowhere else). Add to it with
#: :func:`register_builder`.
BUILDERS: Mapping[str, type[Flow]] = MappingProxyType(_BUILDERS)

_NAME = re.compile(r"[a-z][a-z0-9_\-]*")


def register_builder(name: str, cls: type[Flow]) -> type[Flow]:
    """Add a builder to :data:`BUILDERS` under ``name``, so that its flows can be saved and loaded.

    :func:`pyroflows.save` writes the name and the flow's :attr:`Flow.config` arguments, and
    :func:`pyroflows.load` rebuilds ``BUILDERS[name](**kwargs)``: register the class (in the
    module that defines it, imported before loading) in every program that saves or loads it.
    A vector builder (first argument ``dim``) registered this way is also accepted by
    ``AutoFlowGuide(flow=name)`` and the command line's ``--flow``.

    A subclass that keeps its parent's constructor needs nothing more. One whose constructor
    takes other arguments records them with :meth:`Flow.set_config` at the end of its
    ``__init__`` (otherwise :func:`pyroflows.save` refuses it, since the parent's arguments
    would not rebuild it).

    Args:
        name: lower-case letters, digits, ``_`` and ``-``, starting with a letter; not one of
            the built-in names. Registering again under the same name replaces a class of the
            same qualified name (a re-run notebook cell), and refuses any other.
        cls: a :class:`Flow` subclass whose constructor takes the :attr:`Flow.config` arguments.

    Returns:
        ``cls``.

    Example:
        >>> import tempfile, torch
        >>> import pyroflows as pf
        >>> from pyroflows.flows import register_builder, unregister_builder
        >>> class WideNSF(pf.NSF):
        ...     def __init__(self, dim: int, width: int = 32) -> None:
        ...         super().__init__(dim, layers=2, hidden=(width, width))
        ...         self.set_config(dim=dim, width=width)
        >>> _ = register_builder("wide_nsf", WideNSF)
        >>> flow = WideNSF(2, width=16)
        >>> flow.config
        {'builder': 'wide_nsf', 'kwargs': {'dim': 2, 'width': 16}}
        >>> loaded = pf.load(pf.save(flow, tempfile.mkdtemp()))
        >>> type(loaded).__name__, loaded.config == flow.config
        ('WideNSF', True)
        >>> unregister_builder("wide_nsf")
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            "name: expected lower-case letters, digits, '_' or '-', starting with a letter; "
            f"got {name!r}"
        )
    if not (isinstance(cls, type) and issubclass(cls, Flow)) or cls is Flow:
        raise TypeError(f"cls: expected a subclass of pyroflows.Flow; got {cls!r}")
    if name in _BUILTIN:
        raise ValueError(
            f"name: {name!r} is a built-in builder ({_BUILTIN[name].__name__}); choose another"
        )
    current = builder_name(cls)
    if current is not None and current != name:
        raise ValueError(f"{cls.__qualname__} is already registered as {current!r}")
    old = _BUILDERS.get(name)
    if old is not None and _qualified_name(old) != _qualified_name(cls):
        raise ValueError(
            f"name: {name!r} is already registered for {_qualified_name(old)}; "
            f"got {_qualified_name(cls)}"
        )
    _BUILDERS[name] = cls
    return cls


def unregister_builder(name: str) -> None:
    """Remove a builder added with :func:`register_builder` from :data:`BUILDERS`.

    Args:
        name: a registered name (not a built-in one).
    """
    if name in _BUILTIN:
        raise ValueError(f"name: {name!r} is a built-in builder; it cannot be removed")
    if name not in _BUILDERS:
        raise ValueError(f"name: expected a registered builder; got {name!r}")
    del _BUILDERS[name]


def builder_name(cls: type) -> str | None:
    """The name under which the class ``cls`` is registered in :data:`BUILDERS`, or ``None``.

    Example:
        >>> import pyroflows as pf
        >>> from pyroflows.flows import builder_name
        >>> builder_name(pf.IAF), builder_name(pf.Flow)
        ('iaf', None)
    """
    for name, registered in _BUILDERS.items():
        if registered is cls:
            return name
    return None


def vector_builders() -> dict[str, type[Flow]]:
    """The builders of :data:`BUILDERS` that take ``dim`` (not image builders), by name.

    These are the choices of the command line's ``--flow`` and of ``AutoFlowGuide(flow=NAME)``.

    Example:
        >>> from pyroflows.flows import vector_builders
        >>> names = sorted(vector_builders())  # the built-in ones
        >>> names[:6]
        ['bnaf', 'cnf', 'iaf', 'linear', 'maf', 'naf']
        >>> names[6:]
        ['nice', 'nsf', 'realnvp', 'residual', 'sylvester']
    """
    return {name: cls for name, cls in _BUILDERS.items() if not cls.image_builder}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
